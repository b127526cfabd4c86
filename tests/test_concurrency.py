"""Two writers at once: DVC refuses a second `dvc repro`; our lock refuses a second trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wanlora.lock import LockedError, hold

HOLDER = """
import sys, time
from wanlora.lock import hold
with hold(sys.argv[1], "training"):
    print("held", flush=True)
    time.sleep(60)
"""


def _start_holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_the_holders_pid(tmp_path: Path):
    lock = tmp_path / "scratch/train.lock"
    proc = _start_holder(lock)
    try:
        with pytest.raises(LockedError) as err:
            with hold(lock, "training"):
                pytest.fail("entered a held lock")
        msg = str(err.value)
        assert f"PID {proc.pid}" in msg and str(lock) in msg and "training is in use" in msg
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL released it: no stale lock, and the file now names us
    with hold(lock) as held:
        assert held.read_text().startswith(f"PID {os.getpid()} ")


def test_lock_is_exclusive_within_one_process_and_reusable_after_release(tmp_path: Path):
    lock = tmp_path / "x.lock"
    with hold(lock):
        with pytest.raises(LockedError, match="in use by PID"):
            with hold(lock):
                pass
    with hold(lock):
        pass


def _dvc(ws: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=ws, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _slow_workspace(ws: Path) -> None:
    """A DVC workspace laid out by wanlora.workspace.prepare, its first stage slowed by a sleep."""
    from wanlora.demo import demo_params
    from wanlora.presets import write_params
    from wanlora.workspace import prepare

    params = demo_params(2)
    prepare(ws, params)
    write_params(ws / "params.yaml", params, "concurrency test")
    script = ws / "stages/scan.py"
    script.write_text("import time\ntime.sleep(30)\n" + script.read_text())


@pytest.mark.slow
def test_second_dvc_repro_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path: Path):
    ws = tmp_path / "ws"
    _slow_workspace(ws)
    first = _dvc(ws, "repro", "scan")
    try:
        seen = []
        for line in first.stdout:
            seen.append(line)
            if "Running stage 'scan'" in line:
                break
        else:
            pytest.fail("first dvc repro never started its stage:\n" + "".join(seen))
        second = _dvc(ws, "repro", "scan")
        out, _ = second.communicate(timeout=120)
        assert second.returncode != 0
        assert "is busy, it is being blocked by" in out and f"(PID {first.pid})" in out, out
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # DVC and its stage, mid-run
        first.wait()
    (ws / "stages/scan.py").write_text((ws / "stages/scan.py").read_text().replace("time.sleep(30)\n", ""))
    again = _dvc(ws, "repro", "scan")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert (ws / "data/index/media.jsonl").is_file()
