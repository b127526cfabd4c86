"""Find the picture inside letterbox (top/bottom) or pillarbox (left/right) bars.

Bars are constant and dark in every frame, while the picture changes: a row or column belongs to a
bar only if it is dark in all sampled frames. Sampling a few frames spread over the kept range
keeps a dark opening shot from being mistaken for a bar. If "bars" would leave less than
MIN_PICTURE of a side, the frames are simply dark and nothing is cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_PICTURE = 0.3


def detect_crop(frames: Sequence[np.ndarray], black_level: float) -> list[int]:
    """[x, y, w, h] of the picture in uint8 grey frames of equal size (displayed orientation)."""
    if not frames:
        raise ValueError("detect_crop needs at least one frame")
    stack = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    _, h, w = stack.shape
    row_peak = stack.mean(axis=2).max(axis=0)  # brightest appearance of each row
    col_peak = stack.mean(axis=1).max(axis=0)
    top, bottom = _dark_edges(row_peak, black_level)
    left, right = _dark_edges(col_peak, black_level)
    if h - top - bottom < MIN_PICTURE * h:
        top = bottom = 0
    if w - left - right < MIN_PICTURE * w:
        left = right = 0
    return [left, top, w - left - right, h - top - bottom]


def _dark_edges(profile: np.ndarray, black_level: float) -> tuple[int, int]:
    """Lengths of the dark runs at the start and the end of a 1-D brightness profile."""
    bright = np.flatnonzero(profile > black_level)
    if bright.size == 0:
        return 0, 0
    return int(bright[0]), int(len(profile) - 1 - bright[-1])
