"""Exact resume: a run interrupted at any step and restarted gives the losses and the LoRA bytes of
a run that was never interrupted (in-process exception, and a real SIGKILL of the stage)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import copy_workspace, crash_at_step, make_workspace, tiny_params
from wanlora.io import atomic_write_yaml
from wanlora.train import loop


RICH = {  # every piece of state a step touches: accumulation, dropout, DOP, EMA, 8-bit Adam, schedule
    "train": {"steps": 10, "gradient_accumulation": 2, "caption_dropout": 0.3, "optimizer": "adamw8bit",
              "lr_scheduler": "cosine", "warmup_steps": 2, "timestep_type": "sigmoid",
              "dop": {"enabled": True, "multiplier": 0.5}, "ema": {"enabled": True, "decay": 0.9}},
    "multistage": {"switch_every": 3},
    "save": {"every": 3, "keep_last": 3},
}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("resume")
    return make_workspace(base / "ws", base / "model"), base / "model"


def _losses(ws: Path) -> list[dict[str, float]]:
    state = next((ws / "scratch/train").glob("*/state_*/state.json"))
    rows = json.loads(state.read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_s", "peak_mem")} for r in rows]


def _lora_bytes(ws: Path) -> dict[str, bytes]:
    return {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted((ws / "data/lora").rglob("*.safetensors"))}


def _dvc_cleans_outs(ws: Path) -> None:
    """DVC deletes a stage's outputs before it reruns the stage."""
    shutil.rmtree(ws / "data/lora", ignore_errors=True)
    shutil.rmtree(ws / "data/train_live", ignore_errors=True)


@pytest.fixture(scope="module")
def uninterrupted(template, tmp_path_factory) -> Path:
    ws = copy_workspace(template[0], tmp_path_factory.mktemp("full") / "ws")
    loop.run_stage(tiny_params(template[1], **RICH), ws)
    return ws


def test_exception_at_random_step_then_resume(template, uninterrupted, tmp_path, monkeypatch):
    ws = copy_workspace(template[0], tmp_path / "ws")
    params = tiny_params(template[1], **RICH)
    crash_at = random.Random(5).randint(4, 8)  # after at least one checkpoint, before the last
    crash_at_step(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        loop.run_stage(params, ws)
    monkeypatch.undo()
    _dvc_cleans_outs(ws)
    loop.run_stage(params, ws)
    assert _losses(ws) == _losses(uninterrupted)
    assert len(_losses(ws)) == 10
    got, want = _lora_bytes(ws), _lora_bytes(uninterrupted)
    assert list(got) == [f"data/lora/{e}/step_{s:06d}.safetensors" for e in ("high", "low") for s in (6, 9, 10)]
    assert got == want
    tsv = (ws / "data/train_live/plots/metrics/loss_high.tsv").read_text()
    assert tsv == (uninterrupted / "data/train_live/plots/metrics/loss_high.tsv").read_text()


def test_rerun_after_finish_republishes_same_files(template, uninterrupted, tmp_path):
    ws = copy_workspace(uninterrupted, tmp_path / "ws")
    _dvc_cleans_outs(ws)
    loop.run_stage(tiny_params(template[1], **RICH), ws)
    assert _lora_bytes(ws) == _lora_bytes(uninterrupted)


@pytest.mark.slow  # a fresh interpreter imports torch + diffusers: 10-25 s on the shared machine
def test_sigkill_of_the_stage_then_resume(template, uninterrupted, tmp_path):
    ws = copy_workspace(template[0], tmp_path / "ws")
    params = tiny_params(template[1], **RICH)
    atomic_write_yaml(ws / "run.yaml", params.model_dump(mode="json"))
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from wanlora.config import load_params\n"
        "from wanlora.train.loop import run_stage\n"
        "run_stage(load_params(Path(sys.argv[1]) / 'run.yaml'), Path(sys.argv[1]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(ws)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:
        pointer = list((ws / "scratch/train").glob("*/latest.json"))
        if pointer:
            killed_after = json.loads(pointer[0].read_text())["step"]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert killed_after is not None and killed_after < 10
    _dvc_cleans_outs(ws)
    loop.run_stage(params, ws)
    assert _losses(ws) == _losses(uninterrupted)
    assert _lora_bytes(ws) == _lora_bytes(uninterrupted)


def test_run_key_follows_what_the_stage_reads(template):
    ws, root = template
    base = tiny_params(root, **RICH)
    experts = {"high": "models/wan@main#1111", "low": "models/wan@main#2222"}
    key = loop.run_key(base, ws, experts)
    same = tiny_params(root, **RICH, sample={"prompts": ["[trigger] on a beach"]}, export={"step": "last"})
    assert loop.run_key(same, ws, experts) == key  # sample/export edits keep a half-trained run resumable
    assert loop.run_key(tiny_params(root, **{**RICH, "network": {"rank": 8}}), ws, experts) != key
    assert loop.run_key(tiny_params(root, **RICH, job={"seed": 4}), ws, experts) != key
    # new weights under the same model path (a re-download, an edited shard) start a new run
    assert loop.run_key(base, ws, {**experts, "low": "models/wan@main#3333"}) != key


def test_save_state_sweeps_leftovers_of_killed_saves(tmp_path):
    """A SIGKILL mid-save leaves a hidden temp folder and temp file; the next save removes them."""
    from wanlora.train.checkpoint import load_state, save_state

    (tmp_path / ".state_000004.abcd").mkdir()
    (tmp_path / ".state_000004.abcd/tensors.safetensors").write_bytes(b"torn")
    (tmp_path / ".latest.json.x1y2.tmp").write_text("{")
    save_state(tmp_path, 5, {"w": torch.ones(2)}, {"cursor": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "state_000005"]
    tensors, plain = load_state(tmp_path)
    assert tensors["w"].tolist() == [1.0, 1.0] and plain["cursor"] == 3 and plain["step"] == 5
