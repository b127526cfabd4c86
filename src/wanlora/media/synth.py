"""Small generated clips and images with known ground truth: for tests, the demo and benchmarks.

Real footage cannot ship with the project and has no labels; these clips do. Each one is built
from named parts (a moving shot, a static intro or outro of a known kind and length, letterbox
bars, a hard cut) so a test can say exactly which frames the trim stage must keep and which crop
it must find. Moving parts scroll a smooth colour texture and move a bright disc, so every frame
differs from the last the way camera motion does; static parts are held frames, black, a fade, or
a title card with fresh sensor noise on every frame (still, but never bit-identical).

Videos are written with PyAV (MPEG-4 Part 2 by default: fast, accepts odd sizes; H.264 for the
benchmark), which can also set a display rotation, the way phones tag portrait clips.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

from wanlora.io import atomic_write_bytes, atomic_write_text

StaticKind = Literal["black", "frozen", "title", "fade"]


@dataclass(frozen=True)
class Shot:
    """A moving shot: a colour texture scrolling by (dx, dy) px a frame, with a moving disc."""

    seed: int
    dx: int = 2
    dy: int = 1


def _texture(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random colour field, tiled so that scrolling with np.roll never shows a seam."""
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 226, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def moving_frames(shot: Shot, width: int, height: int, n: int, t0: int = 0) -> Iterator[np.ndarray]:
    """n RGB frames of a moving shot, starting at time step t0 (so shots can be split and resumed)."""
    tex = _texture(width, height, shot.seed)
    radius = max(3, min(width, height) // 6)
    for t in range(t0, t0 + n):
        frame = np.roll(tex, (t * shot.dy, t * shot.dx), axis=(0, 1))
        cx = int(width / 2 + (width / 3) * np.sin(t * 0.21 + shot.seed))
        cy = int(height / 2 + (height / 3) * np.cos(t * 0.17 + shot.seed))
        cv2.circle(frame, (cx, cy), radius, (250, 250, 250), -1)
        yield frame


def title_card(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A grey card with white text-like blocks (no font needed)."""
    rng = np.random.default_rng(seed + 1000)
    card = np.full((height, width, 3), 70, np.uint8)
    rows = max(1, height // 16)
    for r in range(rows):
        y = int((r + 0.5) * height / (rows + 0.5))
        x = int(rng.integers(2, max(3, width // 4)))
        length = int(rng.integers(width // 3, width // 2 + 2))
        cv2.rectangle(card, (x, y), (x + length, y + max(1, height // 24)), (235, 235, 235), -1)
    return card


def static_frames(
    kind: StaticKind, anchor: np.ndarray, n: int, *, into: bool, noise: float = 4.0, seed: int = 0
) -> Iterator[np.ndarray]:
    """n frames of a static part next to `anchor` (the first or last frame of the moving shot).

    black: pure black; frozen: `anchor` held; title: a noisy title card; fade: `anchor` held while
    fading from black (into=True, an intro) or to black (into=False, an outro).
    """
    h, w = anchor.shape[:2]
    rng = np.random.default_rng(seed + 7)
    card = title_card(w, h, seed).astype(np.float32)
    for i in range(n):
        if kind == "black":
            yield np.zeros_like(anchor)
        elif kind == "frozen":
            yield anchor.copy()
        elif kind == "title":
            yield np.clip(card + rng.normal(0, noise, card.shape), 0, 255).astype(np.uint8)
        elif kind == "fade":
            alpha = (i + 1) / (n + 1) if into else (n - i) / (n + 1)
            yield (anchor.astype(np.float32) * alpha).round().astype(np.uint8)
        else:
            raise ValueError(f"unknown static kind {kind!r}; use black, frozen, title or fade")


def letterbox(frame: np.ndarray, width: int, height: int, left: int, top: int) -> np.ndarray:
    """Place `frame` on a black canvas of width x height at (left, top)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[top : top + frame.shape[0], left : left + frame.shape[1]] = frame
    return canvas


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    codec: str = "mpeg4",
    rotation: int = 0,
    gop: int = 12,
    faststart: bool = False,
) -> int:
    """Encode RGB frames to `path` (atomically); returns the frame count.

    `rotation` is the display rotation in PyAV's sense (degrees counter-clockwise for display); the
    frames are the coded (unrotated) pictures. `faststart` puts the index at the front, so a
    truncated copy still opens and fails only when decoding reaches the missing part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.synth{path.suffix}")
    options = {"movflags": "faststart"} if faststart else {}
    count = 0
    with av.open(str(tmp), "w", options=options) as out:
        stream = None
        for frame in frames:
            if stream is None:
                stream = out.add_stream(codec, rate=_rate(fps), options={"g": str(gop)} if codec == "libx264" else {})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.bit_rate = max(400_000, int(frame.shape[0] * frame.shape[1] * fps * 0.6))
                if codec != "libx264":
                    stream.codec_context.gop_size = gop
                if rotation:
                    stream.set_display_rotation(rotation)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    return count


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


@dataclass(frozen=True)
class ClipSpec:
    """A generated clip: a moving middle, optional static intro/outro, bars, a cut, rotation."""

    width: int = 96
    height: int = 64
    fps: float = 24.0
    moving: int = 48
    intro: StaticKind | None = None
    intro_frames: int = 0
    outro: StaticKind | None = None
    outro_frames: int = 0
    bars: tuple[int, int] = (0, 0)  # (left, top) bar thickness; the picture is centred between bars
    cut_at: int | None = None  # frame of the moving part where a hard cut to a second shot happens
    noise: float = 0.0  # sensor noise added to every frame
    rotation: int = 0  # display rotation (counter-clockwise); width/height are the coded size
    seed: int = 0


def clip_frames(spec: ClipSpec) -> Iterator[np.ndarray]:
    """The coded RGB frames of a ClipSpec, in order."""
    left, top = spec.bars
    iw, ih = spec.width - 2 * left, spec.height - 2 * top
    first_shot = Shot(spec.seed)
    second_shot = Shot(spec.seed + 101, dx=-1, dy=2)
    cut = spec.moving if spec.cut_at is None else spec.cut_at
    middle = [*moving_frames(first_shot, iw, ih, cut), *moving_frames(second_shot, iw, ih, spec.moving - cut)]
    parts: list[np.ndarray] = []
    if spec.intro:
        parts += static_frames(spec.intro, middle[0], spec.intro_frames, into=True, seed=spec.seed)
    parts += middle
    if spec.outro:
        parts += static_frames(spec.outro, middle[-1], spec.outro_frames, into=False, seed=spec.seed + 1)
    rng = np.random.default_rng(spec.seed + 3)
    for picture in parts:
        frame = letterbox(picture, spec.width, spec.height, left, top) if (left or top) else picture
        if spec.noise:
            frame = np.clip(frame + rng.normal(0, spec.noise, frame.shape), 0, 255).astype(np.uint8)
        yield frame


def make_clip(path: str | Path, spec: ClipSpec, *, codec: str = "mpeg4", gop: int = 12) -> dict:
    """Write a ClipSpec as a video; return its ground truth in the clips.jsonl vocabulary."""
    n = write_video(path, clip_frames(spec), spec.fps, codec=codec, rotation=spec.rotation, gop=gop)
    left, top = spec.bars
    crop = [left, top, spec.width - 2 * left, spec.height - 2 * top]
    width, height = spec.width, spec.height
    if spec.rotation in (90, 270):  # ground truth in displayed coordinates
        width, height = height, width
        crop = _rotate_box(crop, spec.width, spec.height, spec.rotation)
    return {
        "frames": n,
        "fps": float(spec.fps),
        "width": width,
        "height": height,
        "rotation": spec.rotation,
        "keep_start": spec.intro_frames if spec.intro else 0,
        "keep_end": (spec.intro_frames if spec.intro else 0) + spec.moving,
        "crop": crop,
        "cut_frame": None if spec.cut_at is None else (spec.intro_frames if spec.intro else 0) + spec.cut_at,
    }


def _rotate_box(box: list[int], width: int, height: int, rotation: int) -> list[int]:
    """A coded-frame box [x, y, w, h] in displayed coordinates after a counter-clockwise turn."""
    x, y, w, h = box
    if rotation == 90:  # np.rot90 k=1: column x becomes row (width - x - w)
        return [y, width - x - w, h, w]
    if rotation == 180:
        return [width - x - w, height - y - h, w, h]
    if rotation == 270:
        return [height - y - h, x, h, w]
    return list(box)


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB image atomically; the format follows the file extension."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode '{path.suffix}' images")
    atomic_write_bytes(path, buf.tobytes())


# ------------------------------------------------------------------------------------ demo
_DEMO_CLIPS: dict[str, tuple[ClipSpec, str | None]] = {
    # name: (spec, caption; None = no caption file)
    "walk_black_intro.mp4": (ClipSpec(96, 64, 16, 40, intro="black", intro_frames=8, seed=1), "[trigger] walking past a wall"),
    "dance_frozen_outro.mp4": (ClipSpec(64, 64, 24, 56, outro="frozen", outro_frames=12, seed=2), "[trigger] dancing in a room"),
    "wave_title.mp4": (ClipSpec(128, 96, 16, 36, intro="title", intro_frames=12, seed=3), "a person waving, [trigger]"),
    "spin_letterbox.mp4": (ClipSpec(128, 96, 24, 60, bars=(0, 12), seed=4), "[trigger] spinning around"),
    "jump_fades.mp4": (
        ClipSpec(96, 64, 16, 36, intro="fade", intro_frames=6, outro="fade", outro_frames=6, seed=5),
        "someone jumping",
    ),
    "run_cut.mp4": (ClipSpec(96, 96, 24, 60, cut_at=30, seed=6), None),
    "too_short.mp4": (ClipSpec(64, 64, 16, 8, seed=7), "[trigger] a blink"),
}


def make_demo_raw(folder: Path, trigger: str = "[trigger]", seed: int = 0) -> dict:
    """Write a tiny demo dataset into `folder`; return the ground truth for tests and the demo.

    Six usable clips (64x64 to 128x96, 2-3 s at 16-24 fps) with intros, outros, bars and a hard
    cut; two images; captions with and without the trigger, one clip without a caption; and one
    bad file of each kind the stages must report: zero-byte, truncated and fake .mp4, a clip too
    short for any bucket, an orphan caption, a Latin-1 caption.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth: dict = {"clips": {}, "images": {}, "captions": {}, "bad": {}}
    for name, (spec, caption) in _DEMO_CLIPS.items():
        spec = replace(spec, seed=spec.seed + seed * 1000)
        truth["clips"][name] = make_clip(folder / name, spec)
        if caption is not None:
            text = caption.replace("[trigger]", trigger)
            atomic_write_text(folder / f"{Path(name).stem}.txt", text + "\n")
            truth["captions"][name] = text
    for name, (w, h, s) in {"portrait.png": (64, 96, 11), "landscape.jpg": (96, 64, 12)}.items():
        write_image(folder / name, next(moving_frames(Shot(s + seed * 1000), w, h, 1)))
        truth["images"][name] = {"width": w, "height": h, "crop": [0, 0, w, h]}
    atomic_write_text(folder / "portrait.txt", f"{trigger} standing still\n")
    truth["captions"]["portrait.png"] = f"{trigger} standing still"
    # A caption in Latin-1 (the é is one byte, 0xE9): the captions stage must report or decode it.
    atomic_write_bytes(folder / "landscape.txt", f"{trigger} caf\u00e9 terrace\n".encode("latin-1"))
    truth["captions"]["landscape.jpg"] = f"{trigger} caf\u00e9 terrace"

    atomic_write_bytes(folder / "empty.mp4", b"")
    good = (folder / "walk_black_intro.mp4").read_bytes()
    atomic_write_bytes(folder / "truncated.mp4", good[: len(good) // 2])
    atomic_write_text(folder / "notes.mp4", "this is a text file, not a video\n")
    atomic_write_text(folder / "orphan.txt", f"{trigger} a clip that was deleted\n")
    truth["bad"] = {
        "empty.mp4": "empty file",
        "truncated.mp4": "incomplete MP4",
        "notes.mp4": "cannot be decoded",
        "too_short.mp4": "too short",
        "orphan.txt": "caption without",
        "landscape.txt": "not UTF-8",
    }
    truth["missing_caption"] = ["run_cut.mp4"]
    return truth
