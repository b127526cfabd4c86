"""Helpers shared by the tests: stage inputs built the way the pipeline builds them."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from wanlora.config import DatasetConfig
from wanlora.data.scan import run_stage as scan_stage
from wanlora.io import sha256_file
from wanlora.pipeline import INDEX, MEDIA_INDEX


def scan_index(datasets: dict[str, DatasetConfig], workspace: Path) -> Path:
    """Run the scan stage into the workspace's data/index and return its media index: what the
    trim stage reads (trim never walks a dataset folder itself)."""
    scan_stage(datasets, workspace, workspace / INDEX)
    return workspace / MEDIA_INDEX


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (links not followed), to prove a run modified nothing."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def write_audio_only(path: Path, seconds: float = 0.5) -> None:
    """An .mp4 holding only an AAC track: opens as a container, has no video."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        n = int(44100 * seconds)
        samples = (np.sin(np.arange(n) / 20.0) * 0.2).astype(np.float32)[None, :]
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}
