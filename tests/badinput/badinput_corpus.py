"""A generated corpus of bad (and merely awkward) inputs, each with the outcome the pipeline owes it.

Why generated: real broken footage cannot ship with the project, and a byte-exact fixture would
hide *how* it is broken. Every case here is built from a good tiny clip by one named damage, so a
failing test says which kind of damage the pipeline no longer survives.

Outcomes:
- `skip`: the file is left out and a report (data/index, data/trimmed, data/buckets or
  data/captions problems) names it with a reason containing `match`.
- `train`: awkward but valid; the clip must reach the train stage's samples.
- `warn`: the clip trains, and its captions record carries a warning containing `match`.
- `report`: the clip trains, and a report names it with a reason containing `match` (a duplicate).
- `stop`: outside the raw folder (params, model, LoRA files): the command refuses with a
  message containing `match` that names the file or key and the fix.

Sizes stay tiny (64 px, about a second) so the whole corpus runs through `dvc repro` in about a
minute; the 8K case is three nearly flat frames at a low bitrate.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image

from tests._helpers import write_audio_only
from wanlora.io import atomic_write_bytes, atomic_write_text
from wanlora.media.synth import ClipSpec, clip_frames, make_clip, write_video

Outcome = Literal["skip", "train", "warn", "report", "stop"]
TRIGGER = "zqx"
# A good clip: 64x64, 16 frames at 8 fps, moving the whole time (one 9-frame window fits).
GOOD = ClipSpec(64, 64, 8.0, 16, seed=40)


@dataclass(frozen=True)
class Case:
    name: str  # file name in the raw folder (raw cases) or a short label (stop cases)
    what: str  # the damage, in words
    expect: Outcome
    match: str  # substring of the reported reason / warning / error (lower case compare)


def _spec(seed: int, **kw) -> ClipSpec:
    return replace(GOOD, seed=seed, **kw)


# --------------------------------------------------------------------------- writers
def _write_frames(path: Path, frames: list[np.ndarray], *, codec: str, pix_fmt: str, fps: int = 8,
                  pts: list[int] | None = None, in_format: str = "rgb24", options: dict | None = None) -> None:
    """Encode frames with any PyAV encoder and pixel format (10-bit, alpha, VFR timestamps)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps, options=options or {})
        rows, stream.width = frames[0].shape[:2]
        stream.height = rows * 2 // 3 if in_format == "yuv420p" else rows  # planar: Y rows then U, V
        stream.pix_fmt = pix_fmt
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=in_format)
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _frames(spec: ClipSpec) -> list[np.ndarray]:
    return list(clip_frames(spec))


def _pickle_bomb(path: Path, marker: Path) -> None:
    """A pickle that, if ever unpickled, creates `marker` (what a malicious checkpoint would do)."""

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    atomic_write_bytes(path, pickle.dumps({"state_dict": Bomb()}))


def write_pickle_bombs(folder: Path, marker: Path) -> dict[str, Path]:
    """A .pt, a .ckpt and a .bin that would create `marker` if loaded with torch.load/pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {ext: folder / f"lora_high_noise.{ext}" for ext in ("pt", "ckpt", "bin")}
    for path in files.values():
        _pickle_bomb(path, marker)
    return files


# ------------------------------------------------------------------------------ corpus
def write_raw_corpus(raw: Path, outside: Path, links: bool = True) -> list[Case]:
    """Write every raw-folder case into `raw` (and a target file into `outside`); return the cases.

    `outside` must be a folder outside `raw` (the escaping symlink points there). `links=False`
    leaves out the symlink cases: `dvc add`/`dvc repro` themselves crash on a link loop in a
    tracked folder and copy a link's outside target in, before any stage of ours runs.
    """
    raw.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, what: str, expect: Outcome, match: str, caption: bool = True) -> Path:
        """Register a case and give it a good caption, so its own damage is the only fault."""
        cases.append(Case(name, what, expect, match))
        if caption:
            atomic_write_text(raw / f"{Path(name).stem}.txt", f"{TRIGGER} {what}\n")
        return raw / name

    good_bytes_path = raw / "ok_plain.mp4"
    make_clip(add("ok_plain.mp4", "a good clip", "train", ""), _spec(41))
    good = good_bytes_path.read_bytes()

    # ---- broken containers and streams
    atomic_write_bytes(add("zero.mp4", "zero-byte file", "skip", "empty file"), b"")
    atomic_write_bytes(add("truncated.mp4", "first half of a good mp4", "skip", "incomplete mp4"), good[: len(good) // 2])
    rng = np.random.default_rng(1)
    garbage = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    atomic_write_bytes(add("garbage_after_header.mp4", "ftyp box then random bytes", "skip", "incomplete mp4"),
                       good[:32] + garbage)
    atomic_write_text(add("text.mp4", "a text file named .mp4", "skip", "cannot be decoded"), "not a video\n")
    # mp4 names the codec twice (sample entry and esds), so FFmpeg sees through a renamed tag;
    # Matroska names it once: an unknown CodecID leaves FFmpeg with no decoder.
    mkv = raw / ".unknown_codec.tmp.mkv"
    _write_frames(mkv, _frames(_spec(52)), codec="mpeg4", pix_fmt="yuv420p")
    atomic_write_bytes(add("unknown_codec.mkv", "Matroska stream with an unknown CodecID", "skip", "decoder not found"),
                       mkv.read_bytes().replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ASP"))
    mkv.unlink()
    write_audio_only(add("audio_only.mp4", "AAC track, no video", "skip", "audio-only"))
    # Shorter than the smallest (9-frame) bucket. Were a 1-frame bucket allowed, they would train
    # as stills ("a clip gets the largest bucket that fits").
    write_video(add("one_frame.mp4", "a single frame", "skip", "too short"), _frames(_spec(42))[:1], 8)
    make_clip(add("short.mp4", "5 frames, shorter than the 9-frame bucket", "skip", "too short"), _spec(43, moving=5))
    write_video(add("all_black.mp4", "16 black frames", "skip", "no motion"),
                [np.zeros((64, 64, 3), np.uint8)] * 16, 8)
    still = _frames(_spec(44))[0]
    write_video(add("all_static.mp4", "one frame held 16 times", "skip", "no motion"), [still] * 16, 8)

    # ---- extreme but valid geometry
    _write_frames(add("huge_8k.mkv", "7680x4320, 3 nearly flat frames, H.264 at a low bitrate", "skip", "too short"),
                  _flat_yuv(7680, 4320, 3), codec="libx264", pix_fmt="yuv420p", in_format="yuv420p",
                  options={"preset": "ultrafast", "crf": "40"})
    # Smaller than every resolution: buckets picks an aligned size inside the source (16x16).
    make_clip(add("tiny_16.mp4", "16x16 frames (below the 64 px bucket)", "train", ""), _spec(45, width=16, height=16))
    make_clip(add("odd_dims.mp4", "67x65 frames", "train", ""), _spec(46, width=67, height=65))
    make_clip(add("rotated.mp4", "display rotation 90", "train", ""), _spec(47, width=96, height=64, rotation=90))
    frames = _frames(_spec(48, moving=24))
    _write_frames(add("vfr.mkv", "variable frame rate timestamps", "train", ""), frames, codec="mpeg4",
                  pix_fmt="yuv420p", pts=[int(1000 * t) for t in np.cumsum([0] + [0.08, 0.16] * 11 + [0.08])])
    _write_frames(add("tenbit.mkv", "H.264 10-bit (yuv420p10le)", "train", ""), _frames(_spec(49)),
                  codec="libx264", pix_fmt="yuv420p10le", options={"preset": "ultrafast"})
    rgba = [np.dstack([f, np.full(f.shape[:2], 128, np.uint8)]) for f in _frames(_spec(50))]
    _write_frames(add("alpha.mov", "PNG codec with an alpha channel", "train", ""), rgba, codec="png",
                  pix_fmt="rgba", in_format="rgba")

    # ---- images
    atomic_write_bytes(add("corrupt.png", "PNG signature then garbage", "skip", "not a readable image"),
                       b"\x89PNG\r\n\x1a\n" + garbage[:200])
    cmyk = Image.fromarray(_frames(_spec(51))[0]).convert("CMYK")
    path = add("cmyk.jpg", "CMYK JPEG", "train", "")
    cmyk.save(path, "JPEG")

    # ---- captions (each beside its own good clip)
    caption_cases = {
        "cap_missing": (None, "skip", "no caption file"),
        "cap_empty": (b"", "skip", "empty"),
        "cap_space": (b" \t\n \n", "skip", "empty"),
        "cap_latin1": (f"{TRIGGER} caf\u00e9 terrace\n".encode("latin-1"), "skip", "utf-8"),
        "cap_utf16": (f"{TRIGGER} na\u00efve walk\n".encode("utf-16"), "train", ""),
        "cap_long": (("word " * 2000).encode(), "skip", "over the limit"),
        "cap_trigger_only": (f"{TRIGGER}\n".encode(), "warn", "only the trigger"),
    }
    for i, (stem, (data, expect, match)) in enumerate(caption_cases.items()):
        make_clip(raw / f"{stem}.mp4", _spec(60 + i))
        cases.append(Case(f"{stem}.mp4", f"caption: {stem[4:]}", expect, match))
        if data is not None:
            atomic_write_bytes(raw / f"{stem}.txt", data)

    # ---- same stem, two containers: distinct ids, one caption file claimed by both; the same bytes
    # twice, so the second copy (by path) is reported as a duplicate that trains twice as often
    make_clip(add("twin.mp4", "a twin clip", "report", "same content as data/raw/twin.mov"), _spec(70))
    atomic_write_bytes(add("twin.mov", "a twin clip", "train", ""), (raw / "twin.mp4").read_bytes())

    if not links:
        return cases
    # ---- links (no captions: a caption beside a link would be an orphan, a second problem)
    os.symlink("loop_b.mp4", add("loop_a.mp4", "symlink loop a -> b -> a", "skip", "symlink loop", False))
    os.symlink("loop_a.mp4", add("loop_b.mp4", "symlink loop b -> a -> b", "skip", "symlink loop", False))
    outside.mkdir(parents=True, exist_ok=True)
    make_clip(outside / "elsewhere.mp4", _spec(71))
    os.symlink(outside / "elsewhere.mp4", add("escape.mp4", "symlink to a clip outside data/raw", "skip", "outside", False))
    return cases


def _flat_yuv(width: int, height: int, n: int) -> list[np.ndarray]:
    """Big yuv420p frames (no RGB conversion: at 8K that costs seconds) that compress to almost
    nothing: flat grey with a dark band moving across."""
    out = []
    for t in range(n):
        f = np.full((height * 3 // 2, width), 128, np.uint8)
        x = (t * width) // (n + 2)
        f[:height, x : x + width // 8] = 40
        out.append(f)
    return out


# Cases outside the raw folder: what the user hands to commands, not to the pipeline's data.
STOP_CASES: tuple[Case, ...] = (
    Case("model_pickle", "a model folder whose transformer weights are only a .bin pickle", "stop", "pickle"),
    Case("lora_pt", "a .pt pickle offered as a LoRA", "stop", "pickle"),
    Case("lora_ckpt", "a .ckpt pickle offered as a LoRA", "stop", "pickle"),
    Case("lora_bin", "a .bin pickle offered as a LoRA", "stop", "pickle"),
    Case("lora_other_model", "a LoRA with keys for another model", "stop", "shape"),
    Case("params_type", "train.steps: 'ten'", "stop", "train.steps"),
    Case("params_negative", "train.steps: -5", "stop", "train.steps"),
    Case("params_frames", "bucket.num_frames [1, 8] (8 is not 4n+1)", "stop", "4n+1"),
    Case("params_unknown", "train.learning_rate (unknown key)", "stop", "learning_rate"),
)
