"""Start images for image-to-video samples: where each prompt's first frame comes from.

An I2V LoRA is judged on what it makes of a start image, so evaluate samples every prompt from
one: `sample.images[i]` when given (an image, or a video's first frame), else the first frame of
the i-th held-out sample in turn (a clip the LoRA never trained on), else of the training samples
the split scores, else of the first samples of the manifest. The frame is the sample's own
first frame after trim, crop and flip (`wanlora.models.latents.load_frames`, the pixels training
conditions on), cut to the sample size's aspect around its centre and resized to
`sample.width` x `sample.height`, so the pipeline's own resize is the identity and nothing is
stretched. Frames are uint8 RGB: what a PIL image handed to `WanImageToVideoPipeline` holds.
With `train.last_frame` each prompt also gets an end frame (the pipeline's `last_image`): the same
sample's last frame, or `sample.last_images[i]`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wanlora.config import SampleConfig
from wanlora.data.split import Split
from wanlora.errors import UserError


def _fit(crop: Sequence[int], width: int, height: int) -> list[int]:
    """The largest box of the target aspect centred in `crop` ([x, y, w, h])."""
    x, y, w, h = crop
    if w * height > h * width:  # wider than the target: trim the sides
        nw = max(1, round(h * width / height))
        return [x + (w - nw) // 2, y, nw, h]
    nh = max(1, round(w * height / width))
    return [x, y + (h - nh) // 2, w, nh]


def first_frame(record: Mapping[str, Any], workspace: Path, width: int, height: int, last: bool = False) -> np.ndarray:
    """[H, W, 3] uint8: the first (or `last`) frame of a sample record (or a sample-shaped record of a file)."""
    from wanlora.models.latents import load_frames

    index = record["frame_indices"][-1] if last else record["frame_indices"][0]
    one = {**record, "frame_indices": [index], "num_frames": 1,
           "crop": _fit(record["crop"], width, height), "width": width, "height": height}
    pixels = load_frames(one, workspace)[:, 0]  # [3, H, W] in [-1, 1], from uint8 / 127.5 - 1
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _file_record(rel: str, workspace: Path) -> dict[str, Any]:
    from wanlora.media.probe import MediaError, probe

    path = workspace / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_file():
        raise UserError(f"sample.images: {rel!r} is not a file inside the workspace {workspace}. Fix: put the "
                        "start image in the workspace (e.g. data/start/hero.png) and list its relative path")
    try:
        info = probe(path)
    except MediaError as err:
        raise UserError(f"sample.images: {path}: {err}") from None
    return {"id": rel, "path": rel, "crop": [0, 0, info.width, info.height], "frame_indices": [0], "flip": False}


def start_records(cfg: SampleConfig, split: Split, samples: Mapping[str, dict], workspace: Path,
                  last: bool = False) -> list[dict]:
    """The record whose first frame starts each prompt (see module doc); with `last`, the one whose
    last frame ends it (`sample.last_images`, else the same sample's)."""
    if cfg.images:
        return [_file_record(rel, workspace) for rel in (cfg.last_images if last else cfg.images)]
    pool = list(split.validation_samples) or list(split.training_samples) or sorted(samples)[: len(cfg.prompts)]
    if not pool:
        raise UserError("evaluate: an image-to-video model needs a start image per prompt, and there are no "
                        "samples to take first frames from. Fix: list them in sample.images")
    return [samples[pool[i % len(pool)]] for i in range(len(cfg.prompts))]


def start_frames(cfg: SampleConfig, split: Split, samples: Mapping[str, dict], workspace: Path,
                 last: bool = False) -> list[np.ndarray]:
    """The start frame of each prompt, or with `last` its end frame (`train.last_frame`)."""
    if last and cfg.images and not cfg.last_images:
        raise UserError("train.last_frame is on and sample.images gives start images, but sample.last_images is "
                        "empty. Fix: list a last image per prompt in sample.last_images")
    return [first_frame(r, workspace, cfg.width, cfg.height, last)
            for r in start_records(cfg, split, samples, workspace, last)]


def prompt_frames(cfg: SampleConfig, split: Split, samples: Mapping[str, dict], workspace: Path,
                  last_frame: bool) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Each prompt's start frame at `cfg`'s size and, with `train.last_frame`, its end frame: what
    evaluate samples from, and the train stage's previews at the preview size."""
    ends = start_frames(cfg, split, samples, workspace, last=True) if last_frame else None
    return start_frames(cfg, split, samples, workspace), ends


def frames_digest(frames: Sequence[np.ndarray]) -> list[str]:
    """sha256 of each frame's pixels and shape: what a cached sample started (ended) with, by content."""
    return [hashlib.sha256(f.tobytes() + str(f.shape).encode()).hexdigest() for f in frames]
