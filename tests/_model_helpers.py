"""Shared by the model-layer tests: one tiny Wan 2.2 model per test process, small clips."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from wanlora.io import write_jsonl
from wanlora.models.tiny import make_tiny

_BUILT: dict[int, Path] = {}
_BUILT_TI2V: dict[int, Path] = {}


def tiny_model(tmp_path_factory, seed: int = 0) -> Path:
    """A tiny model folder built once per process and seed (tests must not modify it: use
    `copy_model` for a folder to damage)."""
    if seed not in _BUILT:
        _BUILT[seed] = make_tiny(tmp_path_factory.mktemp(f"tiny{seed}") / "model", seed=seed)
    return _BUILT[seed]


def tiny_ti2v_model(tmp_path_factory, seed: int = 0) -> Path:
    """A tiny TI2V 5B folder built once per process and seed (read-only, as `tiny_model`)."""
    if seed not in _BUILT_TI2V:
        _BUILT_TI2V[seed] = make_tiny(tmp_path_factory.mktemp(f"tiny_ti2v{seed}") / "model", seed=seed, variant="ti2v-5b")
    return _BUILT_TI2V[seed]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_captions(path: Path, captions: dict[str, tuple[str, str | None]]) -> Path:
    """captions.jsonl with id -> (caption, caption_dop) as the captions stage writes it."""
    write_jsonl(path, [{"id": k, "caption": c, "caption_dop": d} for k, (c, d) in captions.items()])
    return path


def clip_frames(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """n RGB uint8 frames of smooth moving gradients (survive lossy coding without noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(n):
        r = 127 + 100 * np.sin((x + 3 * t + seed) / 9.0)
        g = 127 + 100 * np.cos((y - 2 * t) / 7.0)
        b = 127 + 100 * np.sin((x + y + t) / 11.0)
        frames.append(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def write_clip(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write RGB frames as an mp4v .mp4 (PyAV and OpenCV both read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path
