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
- The 64-px measure alone reads slow motion as still: a slow ease-out, a dolly-in or a camera
  drifting a pixel a frame after the subject has left changes a blurred 64-px picture by less
  than sensor noise does (real clips lost 0.4-0.7 s of such endings). So a still run must also be
  still at FINE_SIDE px on a FINE_GRID grid, lightly blurred, where fine motion survives. Noise is
  told from motion by how it behaves over time, with a floor estimated from the run itself: noise
  (grain, JPEG or compression flicker, a noisy title card) differs from the anchor by the same
  amount at every distance, so the drift stays within the differences between neighbouring
  frames; motion accumulates, so the drift against the anchor grows past them. A run stays still
  while its drift is at most DRIFT_FACTOR times the largest neighbour difference so far plus
  DRIFT_MARGIN grey levels (see `drift_limit` for the one jump an encoder adds at a keyframe).
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
FINE_SIDE = 384  # frames are decoded at this size; the 64-px picture is shrunk from it
FINE_GRID = 8
FINE_BLUR_SIGMA = 1.0
DRIFT_FACTOR = 1.25
DRIFT_MARGIN = 0.5
KEYFRAME_JITTER = 1.5
FADE_STEP = 1.05  # a still frame this much brighter than the anchor becomes the new anchor


@dataclass(frozen=True)
class Analysed:
    """One frame reduced for motion analysis: its mean luma, its blurred 64-px picture (coarse
    motion, robust to noise) and its lightly blurred FINE_SIDE-px picture (slow motion)."""

    luma: float
    blurred: np.ndarray  # float32
    fine: np.ndarray  # float32


def _fit(width: int, height: int, side: int, least: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(least, round(width * scale)), max(least, round(height * scale))


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """Displayed (w, h) to decode analysis frames at: longer side at most FINE_SIDE, aspect kept."""
    return _fit(width, height, FINE_SIDE, FINE_GRID)


def analyse(gray: np.ndarray) -> Analysed:
    """Reduce a grey frame (already shrunk to `analysis_size`) for motion comparisons."""
    img = gray.astype(np.float32)
    h, w = img.shape
    small = cv2.resize(img, _fit(w, h, ANALYSIS_SIDE, GRID), interpolation=cv2.INTER_AREA) if max(h, w) > ANALYSIS_SIDE else img
    return Analysed(
        float(img.mean()),
        cv2.GaussianBlur(small, (0, 0), BLUR_SIGMA),
        cv2.GaussianBlur(img, (0, 0), FINE_BLUR_SIGMA),
    )


def _cell_max(a_img: np.ndarray, a_luma: float, b_img: np.ndarray, b_luma: float, grid: int) -> float:
    """Largest per-cell mean absolute difference, the brighter picture scaled to the dimmer's mean."""
    if a_luma > b_luma:
        a_img, a_luma, b_img, b_luma = b_img, b_luma, a_img, a_luma
    diff = np.abs(a_img - b_img * (max(a_luma, 1e-3) / max(b_luma, 1e-3)))
    h, w = diff.shape
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    return max(
        float(diff[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean())
        for i in range(grid)
        for j in range(grid)
        if ys[i + 1] > ys[i] and xs[j + 1] > xs[j]
    )


def motion_score(a: Analysed, b: Analysed) -> float:
    """Largest per-cell mean absolute difference (0-255 scale) between two 64-px pictures."""
    return _cell_max(a.blurred, a.luma, b.blurred, b.luma, GRID)


def fine_score(a: Analysed, b: Analysed) -> float:
    """The same difference on the FINE_SIDE-px pictures over a FINE_GRID grid."""
    return _cell_max(a.fine, a.luma, b.fine, b.luma, FINE_GRID)


def drift_limit(neighbour_scores: list[float], step: float) -> float:
    """Largest fine drift from a run's anchor that is still noise.

    `neighbour_scores` are the fine differences between neighbouring frames of the run so far
    (its own noise floor), `step` the newest frame's difference from the one before. The step
    counts only up to KEYFRAME_JITTER: an encoder re-quantizing a held picture at a keyframe
    moves it once by about that much (the drift jumps by the step, then stays), while a larger
    step that the run's noise does not explain is the picture starting to move.
    """
    return DRIFT_FACTOR * max([*neighbour_scores, min(step, KEYFRAME_JITTER)]) + DRIFT_MARGIN


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
    prev: Analysed | None = None
    lumas: list[float] = []
    neighbours: list[float] = []  # fine differences between consecutive frames of the still run
    i = -1
    for i, f in enumerate(frames):
        black = f.luma <= params.black_level
        if black and anchor is None and i > run_start:  # continuing a black run
            lumas.append(f.luma)
            prev = f
            continue
        if not black and anchor is not None and prev is not None and motion_score(anchor, f) < params.motion_threshold:
            step = fine_score(prev, f)
            if fine_score(anchor, f) <= drift_limit(neighbours, step):
                lumas.append(f.luma)  # continuing a still run
                neighbours.append(step)
                prev = f
                if f.luma > FADE_STEP * anchor.luma:
                    anchor = f
                continue
        # frame i starts a new run: settle the run that just ended
        if i > run_start and not _accept(out, anchor, lumas, run_start, i, params):
            out.moving_found = True
            out.scanned = i + 1
            return out
        run_start, anchor, prev, lumas, neighbours = i, (None if black else f), f, [f.luma], []
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
        out.frames = end
        return True
    # A fade from black into a dark scene clears the black level only in its last few frames, so
    # a still run right after black that keeps brightening is the end of that fade, however short.
    fade_end = bool(out.runs) and out.runs[-1][0] == "black" and lumas[-1] >= FADE_STEP * lumas[0]
    if n >= params.min_static_frames or fade_end:
        # frames darker than the run's brightest are the fade; the rest is the held picture
        peak = max(lumas)
        fading = sum(1 for v in lumas if v < 0.9 * peak)
        out.fade += fading
        out.still += n - fading
        out.runs.append(("fade" if fading else "still", n))
        out.frames = end
        return True
    return False
