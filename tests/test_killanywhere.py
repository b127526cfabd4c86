"""SIGKILL anywhere: a killed `dvc repro` resumes to the bytes an uninterrupted run writes.

Each stage (trim, latent_cache, train, evaluate) is killed with SIGKILL, process group and all,
at a random moment inside its own running time as measured on an uninterrupted reference run;
training is also killed exactly in the middle of a checkpoint save (at the k-th file rename).
After every kill no file at a final name is torn (each safetensors, JSON and JSON Lines file
parses), and the final `dvc repro` writes outputs byte-identical to the reference, LoRAs included
(CPU). Only timing and memory traces are exempt (see VOLATILE).

Environment: WANLORA_KILL_SEED (default 0) picks the kill moments; WANLORA_KILLS (default 1)
kills each stage that many times before letting it finish.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from wanlora.demo import make_demo
from wanlora.io import read_jsonl, sha256_file

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("WANLORA_KILL_SEED", "0"))
KILLS = int(os.environ.get("WANLORA_KILLS", "1"))
STAGES = ("trim", "latent_cache", "train", "evaluate")
# wall-clock step times and process memory: measurements, kept in an out of their own
VOLATILE = {"data/train_perf/perf.json", "data/train_perf/summary.json", "data/train_perf/previews.json"}
# Hashes of other files' bytes, recorded inside LoRAs and the export listing: they differ exactly
# when some upstream file's bytes differ, which test_outputs_are_byte_identical checks on its own.
BYTE_HASHES = {"wanlora.exported_from_sha256", "sha256"}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


class Repro:
    """`dvc repro` in its own process group, its output read (and timestamped) by a thread."""

    def __init__(self, ws: Path, *targets: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *targets], cwd=ws, env=ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, marker: str, timeout: float = 600) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(marker in line for _, line in self.lines):
                return True
            if self.proc.poll() is not None:
                self.reader.join()
                return any(marker in line for _, line in self.lines)
            time.sleep(0.05)
        return False

    def finish(self, timeout: float = 900) -> str:
        self.proc.wait(timeout)
        self.reader.join()
        assert self.proc.returncode == 0, self.text()
        return self.text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()

    def durations(self) -> dict[str, float]:
        """Seconds from each 'Running stage' line to the next stage's (or the end)."""
        marks = [(t, line.split("'")[1]) for t, line in self.lines if line.startswith("Running stage '")]
        ends = [t for t, _ in marks[1:]] + [self.lines[-1][0]]
        return {name: end - t for (t, name), end in zip(marks, ends)}


def outputs(ws: Path, content: bool = False) -> dict[str, str]:
    """Hash of every output file; `content`: of what it holds rather than its exact bytes."""
    data = ws / "data"
    return {
        rel: content_hash(p) if content else sha256_file(p)
        for p in sorted(data.rglob("*"))
        if p.is_file() and not (rel := p.relative_to(ws).as_posix()).startswith("data/raw") and rel not in VOLATILE
    }


def content_hash(path: Path) -> str:
    """Tensors and metadata of a safetensors file (not the header's key order), JSON without the
    byte hashes of other files; anything else its bytes."""
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = {k: v for k, v in (f.metadata() or {}).items() if k not in BYTE_HASHES}
            tensors = {k: sha256_bytes(f.get_tensor(k).numpy().tobytes()) for k in sorted(f.keys())}
        return sha256_bytes(json.dumps([meta, tensors], sort_keys=True).encode())
    if path.suffix == ".json":
        def drop(node):
            if isinstance(node, dict):
                return {k: drop(v) for k, v in node.items() if k not in BYTE_HASHES}
            return [drop(v) for v in node] if isinstance(node, list) else node
        return sha256_bytes(json.dumps(drop(json.loads(path.read_text(encoding="utf-8"))), sort_keys=True).encode())
    return sha256_file(path)


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def torn(ws: Path) -> list[str]:
    """Files at final names (not dot-named temps) under data/ and scratch/ that do not parse."""
    from safetensors import safe_open

    bad = []
    for root in (ws / "data", ws / "scratch"):
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(ws).parts):
                continue
            try:
                if p.suffix == ".safetensors":
                    with safe_open(str(p), framework="pt") as f:
                        [f.get_tensor(k) for k in f.keys()]
                elif p.suffix == ".json":
                    json.loads(p.read_text(encoding="utf-8"))
                elif p.suffix == ".jsonl":
                    read_jsonl(p)
            except Exception as err:  # noqa: BLE001 - any failure to parse is the finding
                bad.append(f"{p.relative_to(ws)}: {err}")
    return bad


def lock_is_valid(ws: Path) -> bool:
    """dvc.lock as DVC validates it. DVC rewrites it in place (truncate, then write) right after a
    stage ends, so a kill in those milliseconds can tear it; our files are not involved."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    try:
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load((ws / "dvc.lock").read_text(encoding="utf-8")) or {})
        return True
    except Exception:  # noqa: BLE001 - unparsable or schema-invalid: torn
        return False


def temp_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name != ".gitignore") if root.exists() else []


SAVE_KILLER = """
import os, signal, sys, runpy
real, count, k = os.replace, [0], int(sys.argv[1])
def replace(src, dst):
    if "scratch" in str(dst):  # the k-th rename of the checkpoint: some files renamed, some not
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
runpy.run_path("stages/train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> tuple[Path, Path, dict[str, float]]:
    ref = tmp_path_factory.mktemp("kill") / "ref"
    make_demo(ref, steps=4)
    params_path = ref / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["save"].update(every=2, keep_last=2)
    params["sample"].update(prompts=params["sample"]["prompts"][:1], validation_clips=1)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    kill = ref.parent / "kill"
    shutil.copytree(ref, kill, symlinks=True)
    run = Repro(ref)
    run.finish()
    return ref, kill, run.durations()


def test_kill_each_stage_anywhere_then_resume_to_identical_outputs(workspaces):
    ref, ws, durations = workspaces
    rng = random.Random(SEED)
    log = []
    for stage in STAGES:
        if stage == "train":  # first exactly inside the first checkpoint save of a fresh run
            Repro(ws, "split", "text_cache", "latent_cache").finish()  # every input of train
            child = subprocess.run([sys.executable, "-P", "-c", SAVE_KILLER, "3"], cwd=ws, env=ENV,
                                   capture_output=True, text=True)
            assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
            assert "resuming" not in child.stderr + child.stdout
            assert torn(ws) == [], log
        for _ in range(KILLS):
            delay = rng.uniform(0.05, 0.95) * durations[stage]
            good_lock = (ws / "dvc.lock").read_bytes() if (ws / "dvc.lock").is_file() else None
            run = Repro(ws, stage)
            assert run.wait_for(f"Running stage '{stage}'"), run.text()
            time.sleep(delay)
            run.kill()
            log.append(f"{stage} killed {delay:.1f}s in (reference {durations[stage]:.1f}s)")
            assert torn(ws) == [], log
            if (ws / "dvc.lock").is_file() and not lock_is_valid(ws):  # the README's advice
                if good_lock is None:
                    (ws / "dvc.lock").unlink()
                else:
                    (ws / "dvc.lock").write_bytes(good_lock)
                log.append("DVC's own dvc.lock write was torn by the kill: restored the last good one (or none)")
    Repro(ws).finish()
    assert torn(ws) == []
    assert temp_leftovers(ws / "data") == [], "temporary files left in declared outputs"
    # A checkpoint killed mid-save leaves its hidden temp folder in scratch/ (never at a final
    # name, never read back); reported to the train owner: save_state should sweep them.
    assert all(Path(p).name.startswith(".") for p in temp_leftovers(ws / "scratch"))
    ours, theirs = outputs(ws, content=True), outputs(ref, content=True)
    assert sorted(ours) == sorted(theirs)
    differ = [k for k in ours if ours[k] != theirs[k]]
    assert not differ, f"differ from the uninterrupted run: {differ}\nkills: {log}"
    assert any(k.startswith("data/lora/high/step_") for k in ours)


def test_outputs_are_byte_identical(workspaces):
    """Runs after the kill test on the same workspaces: byte for byte, not just content."""
    ref, ws, _ = workspaces
    ours, theirs = outputs(ws), outputs(ref)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []
