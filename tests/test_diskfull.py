"""A full disk: writes fail with ENOSPC, no torn or half-written artefact is left, a rerun after
freeing space succeeds and writes what a run with room would have.

The real variant mounts a small tmpfs (needs root; skipped where mounting is not permitted); the
simulated one makes fsync in wanlora.io fail with ENOSPC (what a full disk does to delayed
allocation) and always runs.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import scan_index

from wanlora.config import DatasetConfig
from wanlora.io import atomic_write_bytes, read_jsonl, sha256_file, write_jsonl
from wanlora.media import trim
from wanlora.media.synth import ClipSpec, make_clip
from wanlora.train import checkpoint as ckpt


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 512 KiB tmpfs at tmp_path/fs, unmounted afterwards; skip when mounting is refused."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the simulated test still runs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a filler file until the file system has at most `leave` bytes free."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while shutil.disk_usage(folder).free > leave:
                f.write(b"\0" * max(4096, min(65536, shutil.disk_usage(folder).free - leave)))
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def leftovers(folder: Path) -> list[str]:
    """Temp files of wanlora.io (`.<name>.<random>.tmp`) and synth (`.<name>.synth.<ext>`)."""
    return sorted(p.name for p in folder.rglob(".*.tmp")) + sorted(p.name for p in folder.rglob(".*.synth.*"))


def _datasets(ws: Path) -> dict[str, DatasetConfig]:
    for i in range(3):
        make_clip(ws / "data/raw" / f"c{i}.mp4", ClipSpec(64, 64, 8.0, 16, seed=i))
    return {"main": DatasetConfig(folder="data/raw", bucket={"resolutions": [64], "num_frames": [9]})}


def test_full_tmpfs_keeps_the_old_manifest_and_no_temp_file(small_fs: Path):
    path = small_fs / "clips.jsonl"
    write_jsonl(path, [{"id": "a", "v": 1}])
    old = path.read_bytes()
    filler = fill(small_fs, leave=0)
    rows = [{"id": f"{i:05d}", "pad": "x" * 200} for i in range(2000)]  # ~430 KB
    with pytest.raises(OSError) as err:
        write_jsonl(path, rows)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == old and leftovers(small_fs) == []
    filler.unlink()
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows and leftovers(small_fs) == []


def test_trim_stage_on_a_full_disk_then_rerun(small_fs: Path, tmp_path: Path):
    ws = tmp_path / "ws"
    datasets = _datasets(ws)
    index = scan_index(datasets, ws)
    trim.run_stage(datasets, ws, tmp_path / "roomy", index=index)  # reference: the same stage with room
    out = small_fs / "trimmed"
    filler = fill(small_fs, leave=0)
    with pytest.raises(OSError) as err:
        trim.run_stage(datasets, ws, out, index=index)
    assert err.value.errno == errno.ENOSPC
    assert not out.exists() or not any(out.iterdir())  # nothing at a final name
    assert leftovers(small_fs) == []
    filler.unlink()
    trim.run_stage(datasets, ws, out, index=index)
    for name in ("clips.jsonl", "problems.json", "report.md"):
        assert sha256_file(out / name) == sha256_file(tmp_path / "roomy" / name), name


def test_training_state_on_a_full_disk_keeps_the_previous_checkpoint(small_fs: Path):
    folder = small_fs / "scratch/train/key"
    small = {"w": torch.arange(16, dtype=torch.float32)}
    ckpt.save_state(folder, 1, small, {"epoch": 0})
    ckpt.save_lora_pair(folder, 1, {"high": b"high-1", "low": b"low-1"})
    filler = fill(small_fs, leave=8192)
    big = {"w": torch.zeros(64 * 1024)}  # 256 KiB: cannot fit
    with pytest.raises(OSError) as err:
        ckpt.save_state(folder, 2, big, {"epoch": 1})
    assert err.value.errno == errno.ENOSPC
    tensors, plain = ckpt.load_state(folder)  # latest.json still names a complete state 1
    assert plain["step"] == 1 and torch.equal(tensors["w"], small["w"])
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "lora", "state_000001"]
    with pytest.raises(OSError):
        ckpt.save_lora_pair(folder, 2, {"high": b"h" * 300_000, "low": b"l"})
    assert sorted(p.name for p in (folder / "lora").rglob("*.safetensors")) == ["step_000001.safetensors"] * 2
    filler.unlink()
    ckpt.save_state(folder, 2, big, {"epoch": 1})
    tensors, plain = ckpt.load_state(folder)
    assert plain["step"] == 2 and tensors["w"].numel() == 64 * 1024 and leftovers(small_fs) == []


def test_simulated_enospc_at_the_write_layer(tmp_path: Path, monkeypatch):
    """Without mount rights: every fsync in wanlora.io fails as on a full disk."""
    import wanlora.io as io

    ws = tmp_path / "ws"
    datasets = _datasets(ws)
    index = scan_index(datasets, ws)  # before fsync fails: scan writes through the same layer
    out = tmp_path / "trimmed"
    atomic_write_bytes(out / "clips.jsonl", b"previous\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OSError) as err:
        trim.run_stage(datasets, ws, out, index=index)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.iterdir()) == ["clips.jsonl"]  # no temp file, no new file
    assert (out / "clips.jsonl").read_bytes() == b"previous\n"
    monkeypatch.undo()
    trim.run_stage(datasets, ws, out, index=index)
    rows = read_jsonl(out / "clips.jsonl")
    assert [r["id"] for r in rows] == ["main/c0.mp4", "main/c1.mp4", "main/c2.mp4"]
    assert all(r["status"] == "ok" for r in rows)
