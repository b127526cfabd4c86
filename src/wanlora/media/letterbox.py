"""Find the picture inside letterbox (top/bottom) or pillarbox (left/right) bars.

Bars are constant, flat and dark in every frame, while the picture changes: a row or column
belongs to a bar only if it is dark in all sampled frames and flat along its length (a dark scene
has texture: the night-time street of a real clip has mean luma below the black level in its
darkest columns, but a spread of 5-10 grey levels along each; an encoded black bar, under 1).
Sampling a few frames spread over the kept range keeps a dark opening shot from being mistaken
for a bar. If "bars" would leave less than MIN_PICTURE of a side, the frames are simply dark and
nothing is cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_PICTURE = 0.3
BAR_TEXTURE = 3.0  # largest standard deviation (grey levels) along a row or column of a bar


def detect_crop(frames: Sequence[np.ndarray], black_level: float) -> list[int]:
    """[x, y, w, h] of the picture in uint8 grey frames of equal size (displayed orientation)."""
    if not frames:
        raise ValueError("detect_crop needs at least one frame")
    stack = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    _, h, w = stack.shape
    # each line's brightest and most textured appearance over the frames
    row_peak, row_texture = stack.mean(axis=2).max(axis=0), stack.std(axis=2).max(axis=0)
    col_peak, col_texture = stack.mean(axis=1).max(axis=0), stack.std(axis=1).max(axis=0)
    top, bottom = _dark_edges((row_peak <= black_level) & (row_texture <= BAR_TEXTURE))
    left, right = _dark_edges((col_peak <= black_level) & (col_texture <= BAR_TEXTURE))
    if h - top - bottom < MIN_PICTURE * h:
        top = bottom = 0
    if w - left - right < MIN_PICTURE * w:
        left = right = 0
    return [left, top, w - left - right, h - top - bottom]


def _dark_edges(bar_like: np.ndarray) -> tuple[int, int]:
    """Lengths of the runs of bar-like lines at the start and the end of a 1-D profile."""
    bright = np.flatnonzero(~bar_like)
    if bright.size == 0:
        return 0, 0
    return int(bright[0]), int(len(bar_like) - 1 - bright[-1])
