"""Two writers at once: DVC refuses a second `dvc repro`; our lock refuses a second trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    (ws / "data/raw/a.mp4").write_bytes(b"a clip")  # scan stops on an empty dataset
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


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; die_with_parent is Linux-only")
def test_torchrun_launch_holds_the_lock_and_its_workers_die_with_it(tmp_path: Path):
    """The README's `torchrun --nproc-per-node N stages/train.py`: a second trainer started by hand
    is refused while it runs, and SIGKILL to torchrun's process group also ends the workers, which
    torchrun puts in sessions of their own (torch/distributed/elastic/.../subprocess_handler.py)."""
    from _helpers import make_workspace, tiny_params
    from wanlora.pipeline import sync
    from wanlora.presets import write_params

    ws = make_workspace(tmp_path / "ws", tmp_path / "model")
    params = tiny_params(tmp_path / "model", train={"steps": 100000, "parallel": "data"}, save={"every": 100000})
    write_params(ws / "params.yaml", params, "torchrun lock test")
    sync(ws, params, in_repo=False)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "stages/train.py"], cwd=ws, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = ws / "scratch/train.lock"
    try:
        deadline = time.time() + 240
        while not (lock.is_file() and lock.read_text().startswith("PID ")) or len(_children(run.pid)) < 2:
            assert run.poll() is None, "torchrun exited before training started"
            assert time.time() < deadline, "torchrun's workers never took the lock"
            time.sleep(0.5)
        workers = _children(run.pid)
        second = subprocess.run([sys.executable, "-P", "stages/train.py"], cwd=ws, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "training in this workspace is in use by PID" in second.stdout + second.stderr, second.stderr
        holder = int(lock.read_text().split()[1])
        assert holder in workers, (holder, workers)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "torchrun's workers outlived their launcher"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
