"""Is the picture moving? The frame-differencing core of static intro/outro detection.

Why not PySceneDetect: its detectors find cuts (ContentDetector) and fades through a brightness
threshold (ThresholdDetector), but a frozen frame or a title card is not a cut, so no detector
reports it (STACK.md); and its scan runs from the first frame to the last, so its cost grows with
the clip. What trimming needs is "how long does the picture stay still from this end", which is a
run-length question over frame differences, answered here from either end with early stopping.

The measure, and why each step:
- Analysis frames are grey, shrunk to at most ANALYSIS_SIDE px with area averaging, then blurred:
  averaging removes per-pixel sensor noise (a noisy title card is still) while motion of whole
  shapes survives.
- Before differencing, the brighter frame is scaled down to the mean brightness of the dimmer one,
  so a fade of a still picture (the same picture times a factor) is still, and counts as static.
  Scaling down, never up, keeps sensor noise from being amplified in dark frames. The run's
  anchor moves to each brighter frame of a fade, so once the fade ends motion is judged at full
  brightness again.
- The difference is averaged per cell of a GRID x GRID grid and the largest cell is the score:
  a small subject moving in front of a still background moves one cell a lot, which a mean over
  the whole frame would dilute below the threshold.
- Frames are compared with the first frame of the current still run (its anchor), not with the
  previous frame, so a slow drift accumulates until it counts as motion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

ANALYSIS_SIDE = 64
GRID = 4
BLUR_SIGMA = 2.0
FADE_STEP = 1.05  # a still frame this much brighter than the anchor becomes the new anchor


@dataclass(frozen=True)
class Analysed:
    """One frame reduced for motion analysis: its mean luma and its blurred small picture."""

    luma: float
    blurred: np.ndarray  # float32


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """Displayed (w, h) of analysis frames: longer side at most ANALYSIS_SIDE, aspect kept."""
    scale = min(1.0, ANALYSIS_SIDE / max(width, height))
    return max(GRID, round(width * scale)), max(GRID, round(height * scale))


def analyse(gray: np.ndarray) -> Analysed:
    """Reduce a small grey frame (already shrunk to analysis size) for motion comparisons."""
    img = gray.astype(np.float32)
    return Analysed(float(img.mean()), cv2.GaussianBlur(img, (0, 0), BLUR_SIGMA))


def motion_score(a: Analysed, b: Analysed) -> float:
    """Largest per-cell mean absolute difference (0-255 scale) between two analysed frames."""
    if a.luma > b.luma:
        a, b = b, a
    diff = np.abs(a.blurred - b.blurred * (max(a.luma, 1e-3) / max(b.luma, 1e-3)))
    h, w = diff.shape
    ys = np.linspace(0, h, GRID + 1).astype(int)
    xs = np.linspace(0, w, GRID + 1).astype(int)
    return max(
        float(diff[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean())
        for i in range(GRID)
        for j in range(GRID)
        if ys[i + 1] > ys[i] and xs[j + 1] > xs[j]
    )


@dataclass(frozen=True)
class StillParams:
    black_level: float
    motion_threshold: float
    min_static_frames: int

    @classmethod
    def from_seconds(cls, black_level: float, motion_threshold: float, min_static_seconds: float, fps: float) -> StillParams:
        return cls(black_level, motion_threshold, max(1, math.ceil(min_static_seconds * fps - 1e-9)))


@dataclass
class StaticPrefix:
    """How many frames from one end are static, and what they were."""

    frames: int = 0  # leading frames judged static
    black: int = 0  # of which black
    fade: int = 0  # of which part of a fade (still picture, rising brightness)
    still: int = 0  # of which a held picture (frozen frame, title card)
    moving_found: bool = False  # False: the scan ended (clip end or scan limit) inside static content
    scanned: int = 0  # frames looked at
    runs: list[tuple[str, int]] = field(default_factory=list)  # (kind, length) of each static run


def static_prefix(frames: Iterable[Analysed], params: StillParams) -> StaticPrefix:
    """Count the static frames at the start of `frames` (pass reversed frames for an outro).

    The prefix is a sequence of runs, each either black frames (any length: black is never
    content) or a still picture lasting at least `min_static_frames`. It ends at the first run of
    a still picture that is shorter than that: the picture is moving there. Consumes `frames`
    lazily and stops there, so a caller decoding on demand decodes no further than needed.
    """
    out = StaticPrefix()
    run_start = 0
    anchor: Analysed | None = None  # None while in a black run
    lumas: list[float] = []
    i = -1
    for i, f in enumerate(frames):
        black = f.luma <= params.black_level
        if black and anchor is None and i > run_start:  # continuing a black run
            lumas.append(f.luma)
            continue
        if not black and anchor is not None and motion_score(anchor, f) < params.motion_threshold:
            lumas.append(f.luma)  # continuing a still run
            if f.luma > FADE_STEP * anchor.luma:
                anchor = f
            continue
        # frame i starts a new run: settle the run that just ended
        if i > run_start and not _accept(out, anchor, lumas, run_start, i, params):
            out.moving_found = True
            out.scanned = i + 1
            return out
        run_start, anchor, lumas = i, (None if black else f), [f.luma]
    out.scanned = i + 1
    if i + 1 > run_start:
        # the last run reached the end of what was scanned: static if black or already long enough
        if not _accept(out, anchor, lumas, run_start, i + 1, params):
            out.moving_found = True
    return out


def _accept(out: StaticPrefix, anchor: Analysed | None, lumas: list[float], start: int, end: int, params: StillParams) -> bool:
    """Add run [start, end) to the prefix if it is static; False means motion starts at `start`."""
    n = end - start
    if anchor is None:
        out.black += n
        out.runs.append(("black", n))
    elif n >= params.min_static_frames:
        # frames darker than the run's brightest are the fade; the rest is the held picture
        peak = max(lumas)
        fading = sum(1 for v in lumas if v < 0.9 * peak)
        out.fade += fading
        out.still += n - fading
        out.runs.append(("fade" if fading else "still", n))
    else:
        return False
    out.frames = end
    return True
