"""Previews during training on the tiny model: files at every save, training untouched, the
preview equal to the evaluate sampler's output for the saved checkpoint, the live page, kills."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from _helpers import copy_workspace, make_workspace, tiny_params
from wanlora.evaluate import sampling
from wanlora.models.text import run_stage as text_cache
from wanlora.report import InputError
from wanlora.train import loop

PROMPTS = ["sks person waving", "a red ball"]
PREVIEW = {"preview": True, "prompts": PROMPTS, "preview_steps": 2, "preview_num_frames": 5,
           "preview_width": 32, "preview_height": 32, "preview_guidance_scale": 2.0, "fps": 8}
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("preview")
    ws = make_workspace(base / "ws", base / "model")
    text_cache(root=base / "model", captions_manifest=ws / "data/captions/captions.jsonl", prompts=PROMPTS,
               trigger="sks", dropout=("sks", "person"), out_dir=ws / "data/cache/text", dtype="fp32",
               quant="none", device="cpu")
    return ws, base / "model"


def _run(template, tmp_path, name: str, **sample):
    ws = copy_workspace(template[0], tmp_path / name)
    params = tiny_params(template[1], sample=sample or {"preview": False})
    loop.run_stage(params, ws)
    return ws, params


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _loras(ws: Path) -> dict[str, bytes]:
    return {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted((ws / "data/lora").rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def runs(template, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return _run(template, base, "off"), _run(template, base, "on", **PREVIEW)


def test_previews_appear_at_every_save_with_their_files(runs):
    ws, _ = runs[1]
    out = ws / "data/train_live/previews"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]
    timings = json.loads((ws / "data/train_perf/previews.json").read_text())
    assert [t["step"] for t in timings] == [2, 4, 6] and all(t["seconds"] > 0 for t in timings)
    assert all(t["switches"] == 0 for t in timings)  # both experts stay on the CPU "device"
    for step in ("step_000002", "step_000006"):
        for i in range(len(PROMPTS)):
            frames = _decode(out / step / f"prompt_{i:02d}.mp4")
            assert frames.shape == (5, 32, 32, 3)
            first = np.asarray(Image.open(out / step / f"prompt_{i:02d}.png"))
            assert first.shape == (32, 32, 3)
            assert np.abs(first.astype(int) - frames[0].astype(int)).mean() < 12  # H.264 of the same frame
        sheet = np.asarray(Image.open(out / step / "contact_sheet.png"))
        assert sheet.shape == (32 * len(PROMPTS), 32 * 5, 3)
    a, b = (np.asarray(Image.open(out / s / "contact_sheet.png")) for s in ("step_000002", "step_000006"))
    assert not np.array_equal(a, b)  # the LoRA trained in between: previews show it


def test_previews_never_change_training(runs):
    (off, _), (on, _) = runs
    assert not (off / "data/train_live/previews").exists()
    assert _loras(off) == _loras(on) and _loras(on)
    assert sorted(p.name for p in (off / "scratch/train").iterdir()) == \
        sorted(p.name for p in (on / "scratch/train").iterdir())  # same run key: previews are not in it


def test_the_preview_is_the_evaluate_sampler_on_the_saved_checkpoint(runs, template):
    """The preview at the last step equals what `wanlora.evaluate.sampling` renders from the
    published step-6 files on a freshly loaded base (fp32 files, so the same weights)."""
    from wanlora.evaluate.media import to_uint8
    from wanlora.models.loading import boundary_ratio, load_transformer, load_vae
    from wanlora.models.text import encoder_identity, load_text_embeds, pad_embeds
    from wanlora.train.preview import preview_config

    ws, params = runs[1]
    root = template[1]
    pipe = sampling.build_pipeline(load_transformer(root, "high", "fp32", "cpu"),
                                   load_transformer(root, "low", "fp32", "cpu"), load_vae(root, "fp32", "cpu"),
                                   boundary_ratio(root), params.model.flow_shift)
    enc = encoder_identity(root)
    embed = lambda s: pad_embeds([load_text_embeds(ws / "data/cache/text", s, enc)])  # noqa: E731
    files = {e: ws / f"data/lora/{e}/step_000006.safetensors" for e in ("high", "low")}
    with sampling.lora_applied(pipe, files, "check"):
        videos = sampling.generate(pipe, [embed(p) for p in PROMPTS], embed(""), preview_config(params))
    first = np.asarray(Image.open(ws / "data/train_live/previews/step_000006/prompt_00.png"))
    assert np.abs(first.astype(int) - to_uint8(videos[0][0]).astype(int)).max() <= 1


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed")
def test_live_page_renders_in_chromium(runs, tmp_path):
    ws, _ = runs[1]
    page = ws / "data/train_live/index.html"
    html = page.read_text()
    assert 'http-equiv="refresh"' not in html  # finished: no more reloading
    assert [int(s) for s in re.findall(r'<tr data-step="(\d+)"', html)] == [6, 4, 2]
    assert 'class="series" data-name="loss_high"' in html and 'data-name="loss_low"' in html
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,900", page.as_uri()], check=True, timeout=120, capture_output=True)
    img = np.asarray(Image.open(shot).convert("L")).astype(float)
    assert img.std() > 10 and (img < 128).mean() > 0.01


def test_a_kill_during_a_preview_resumes_to_the_same_files(runs, template, tmp_path, monkeypatch):
    _, (on, _) = runs
    ws = copy_workspace(template[0], tmp_path / "killed")
    params = tiny_params(template[1], sample=PREVIEW)
    real = sampling.generate

    def killed(pipe, *args):
        if killed.calls == 1:  # the second preview (step 4)
            raise KeyboardInterrupt("simulated kill")
        killed.calls += 1
        return real(pipe, *args)

    killed.calls = 0
    monkeypatch.setattr(sampling, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.run_stage(params, ws)
    monkeypatch.undo()
    state = next((ws / "scratch/train").iterdir())
    assert sorted(p.name for p in state.glob("previews/*/step_*")) == ["step_000002"]
    loop.run_stage(params, ws)  # resumes from the step-2 state and renders step 4 again
    assert _loras(ws) == _loras(on)
    mine, ref = ws / "data/train_live", on / "data/train_live"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and "previews" in p.parts or
                   p.name == "index.html")
    assert len(files) == 1 + 3 * (2 * len(PROMPTS) + 2)  # the page; per step: mp4s, pngs, sheet, result
    for rel in files:
        assert (mine / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_a_finished_run_rerun_republishes_its_previews(runs, template, tmp_path):
    """DVC deletes data/train_live before it reruns the stage (a prompt edit): the finished run
    resumes at its last step and puts the previews it rendered back."""
    _, (on, params) = runs
    ws = copy_workspace(on, tmp_path / "again")
    shutil.rmtree(ws / "data/train_live")
    loop.run_stage(params, ws)
    assert sorted(p.name for p in (ws / "data/train_live/previews").glob("step_*")) == \
        ["step_000002", "step_000004", "step_000006"]
    assert (ws / "data/train_live/index.html").is_file()


def test_a_preview_lora_shows_in_previews_only(runs, template, tmp_path):
    """A stacked `sample.preview_lora` changes what the previews show and nothing that is trained
    or saved: the LoRA files match the run without previews byte for byte (had the stacking left
    the training adapter inactive or frozen, the steps after the first preview would differ)."""
    from _helpers import random_lora, save_ours
    from wanlora.models.loading import load_transformer

    (off, _), (on, _) = runs
    files = {e: str(save_ours(tmp_path / f"distill_{e}.safetensors",
                              random_lora(load_transformer(template[1], e, "fp32", "cpu"), seed=i)))
             for i, e in enumerate(("high", "low"))}
    ws, params = _run(template, tmp_path, "distilled", **PREVIEW, preview_lora=files)
    assert _loras(ws) == _loras(off)
    for step in ("step_000002", "step_000006"):
        mine, plain = (np.asarray(Image.open(w / f"data/train_live/previews/{step}/contact_sheet.png"))
                       for w in (ws, on))
        assert np.abs(mine.astype(int) - plain.astype(int)).mean() > 1
    with safe_open(ws / "data/lora/high/step_000006.safetensors", "pt") as f:
        assert not any("preview" in k for k in f.keys())  # nothing stacked is saved with the trained LoRA

    # Stacked, not swapped: the preview is the base with both LoRAs merged in by plain math.
    from _helpers import merged
    from wanlora.evaluate.media import to_uint8
    from wanlora.export.imports import read_lora
    from wanlora.models.loading import boundary_ratio, load_vae
    from wanlora.models.text import encoder_identity, load_text_embeds, pad_embeds
    from wanlora.train.preview import preview_config

    root = template[1]
    experts = {}
    for e in ("high", "low"):
        model = load_transformer(root, e, "fp32", "cpu")
        for f in (ws / f"data/lora/{e}/step_000006.safetensors", Path(files[e])):
            model = merged(model, read_lora(f)[0])
        experts[e] = model
    pipe = sampling.build_pipeline(experts["high"], experts["low"], load_vae(root, "fp32", "cpu"),
                                   boundary_ratio(root), params.model.flow_shift)
    enc = encoder_identity(root)
    embed = lambda s: pad_embeds([load_text_embeds(ws / "data/cache/text", s, enc)])  # noqa: E731
    videos = sampling.generate(pipe, [embed(p) for p in PROMPTS], embed(""), preview_config(params))
    first = np.asarray(Image.open(ws / "data/train_live/previews/step_000006/prompt_00.png"))
    assert np.abs(first.astype(int) - to_uint8(videos[0][0]).astype(int)).max() <= 1


def test_a_missing_preview_lora_stops_before_training(template, tmp_path):
    ws = copy_workspace(template[0], tmp_path / "ws")
    params = tiny_params(template[1], sample={**PREVIEW, "preview_lora": {"low": "loras/lightx2v_low.safetensors"}})
    with pytest.raises(InputError, match=r"sample.preview_lora.low: .*lightx2v_low.safetensors"):
        loop.run_stage(params, ws)
    assert not (ws / "data/lora").exists()  # no step was trained


def test_the_eta_counts_the_time_previews_take(tmp_path):
    """50 steps of 1 s with a 100 s preview after step 10: the remaining 50 steps at the run's
    pace take about 50 * 150 / 50 s, not the 50 s the last 30 s of steps alone suggest."""
    from wanlora.train.monitor import Monitor

    clock = [0.0]
    m = Monitor(tmp_path / "live", tmp_path / "perf", tmp_path / "stage", 100, 0, [])
    m.progress.get_time = m.progress.tasks[0]._get_time = lambda: clock[0]
    try:
        for step in range(1, 51):
            clock[0] += 1.0 + (100.0 if step == 11 else 0.0)
            m.log({"step": float(step), "loss_high": 0.1, "step_time": 1.0, "peak_mem": 0.0})
        eta = m.progress.tasks[0].time_remaining
    finally:
        m.close()
    assert 120 < eta < 180


KILLER = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])  # tests/: the helpers
from _helpers import tiny_params
from wanlora.train import loop
ws, real, count, k, where = Path(sys.argv[1]), os.replace, [0], int(sys.argv[3]), sys.argv[6]
def replace(src, dst):
    rel = Path(dst).relative_to(ws).as_posix()
    if rel.startswith(where) and "/previews/" in f"/{rel}":  # the k-th preview file renamed there
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
loop.run_stage(tiny_params(Path(sys.argv[2]), sample=json.loads(sys.argv[5])), ws)
"""


def _kill_at_rename(template, ws: Path, where: str, k: int) -> None:
    import sys

    child = subprocess.run([sys.executable, "-P", "-c", KILLER, str(ws), str(template[1]), str(k),
                            str(Path(__file__).parent), json.dumps(PREVIEW), where], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]


def _same_live_files(ws: Path, ref: Path) -> None:
    ref = ref / "data/train_live"
    for rel in sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file()):
        assert (ws / "data/train_live" / rel).read_bytes() == (ref / rel).read_bytes(), rel


@pytest.mark.parametrize("k", [1, 4])
def test_a_kill_inside_a_publish_leaves_whole_files_and_no_temp_file(runs, template, tmp_path, k):
    """SIGKILL exactly at the k-th rename of a preview publish (the first file; the middle of the
    first preview): data/train_live holds no temp file (they live in the run's state) and only
    whole files, and the rerun publishes what an uninterrupted run did, byte for byte."""
    _, (on, params) = runs
    ws = copy_workspace(template[0], tmp_path / "torn")
    _kill_at_rename(template, ws, "data/train_live", k)
    data = [p for p in (ws / "data").rglob("*") if p.is_file()]
    assert [p for p in data if p.name.startswith(".")] == []
    previews = [p for p in data if "previews" in p.parts]
    assert len(previews) == k - 1  # the renames before the kill, nothing else
    for p in previews:
        assert p.read_bytes() == (on / p.relative_to(ws)).read_bytes()
    assert list((ws / "scratch/train").glob("*/.publish/.*.tmp"))  # the kill's temp file, in the state
    loop.run_stage(params, ws)
    assert [p for p in ws.rglob(".*.tmp")] == []  # swept when the run came back
    _same_live_files(ws, on)


def test_a_kill_inside_a_preview_render_publishes_no_temp_file(runs, template, tmp_path):
    """SIGKILL at the rename of the first preview's second file in the run's state leaves that
    file's temp beside it there (what kill-anywhere found): the rerun renders the preview again
    and publishes its files, never the dead write's temp."""
    _, (on, params) = runs
    ws = copy_workspace(template[0], tmp_path / "torn")
    _kill_at_rename(template, ws, "scratch/train", 2)
    assert list((ws / "scratch/train").glob("*/previews/*/step_000002/.*.tmp"))
    loop.run_stage(params, ws)
    assert [p for p in (ws / "data").rglob("*") if p.name.startswith(".")] == []
    _same_live_files(ws, on)
