"""Writing sample videos and contact sheets.

Videos are H.264 in yuv420p (what every browser and player decodes), written with PyAV into
memory and then atomically into place; sides are even by construction (multiples of 16). A
contact sheet puts prompts in rows and evenly spaced frames in columns, so one PNG per
checkpoint shows motion and prompt adherence at a glance, and sheets of successive
checkpoints can be flipped through.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from wanlora.io import atomic_write_bytes

MAX_SHEET_COLUMNS = 8


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (what WanPipeline returns with output_type='np') -> uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: BT.601 limited-range RGB -> Y'CbCr rows (Y, Cb, Cr) in 16-bit fixed point: swscale's default
#: matrix for yuv420p, so the videos look as they did when swscale converted them.
_BT601 = np.rint(np.array([[65.481, 128.553, 24.966],
                           [-37.797, -74.203, 112.0],
                           [112.0, -93.786, -18.214]]) / 255 * (1 << 16)).astype(np.int64)

#: x264 slices (PyAV asks for slice threads); fixed so the bytes do not depend on the core count
#: (x264 lowers it for short frames as a function of the height alone).
X264_THREADS = "8"


def yuv420p(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> the [H * 3 / 2, W] yuv420p planes PyAV takes, in integers.

    Done here rather than by swscale so the encoder's input is exact integer arithmetic on any
    CPU. Both ways swscale converted (inside `stream.encode`, then through `reformat`) gave other
    mp4 bytes for the same frames now and then within one process, the second only in full
    test-suite runs; the cause was not pinned down, and x264 alone, given the same planes, was
    repeatable under valgrind, heap churn and load. Chroma is the rounded mean of each 2x2 block;
    flat colours come back as swscale's did.
    """
    h, w, _ = rgb.shape
    if h % 4 or w % 2:  # each chroma plane fills h / 4 rows of width w
        raise ValueError(f"yuv420p needs even sides and a height divisible by 4, got {w}x{h}")
    rgb = rgb.astype(np.int64)
    half = 1 << 15
    y = (rgb @ _BT601[0] + (16 << 16) + half) >> 16
    quad = rgb.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))  # four times each block's mean
    cb = (quad @ _BT601[1] + (128 << 18) + (half << 2)) >> 18
    cr = (quad @ _BT601[2] + (128 << 18) + (half << 2)) >> 18  # limited range: 16..240, no clip
    return np.concatenate([y, cb.reshape(h // 4, w), cr.reshape(h // 4, w)]).astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 mp4 bytes of [F, H, W, 3] frames: same frames, same bytes on one machine.

    Not across CPUs: x264's output depends on the SIMD it finds (its C code alone gave other bytes
    for an 81-frame 832x480 clip than its AVX2 code), while the pixels agree to the codec's error.
    """
    import av

    frames = to_uint8(frames)
    f, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "medium", "threads": X264_THREADS}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv420p(frame), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    atomic_write_bytes(path, encode_mp4(frames, fps))


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))


def sheet_columns(num_frames: int) -> list[int]:
    """Frame indices shown in a contact sheet: all frames up to 8, else 8 evenly spaced (first and last kept)."""
    if num_frames <= MAX_SHEET_COLUMNS:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (MAX_SHEET_COLUMNS - 1)) for i in range(MAX_SHEET_COLUMNS)]


def contact_sheet(videos: list[np.ndarray]) -> np.ndarray:
    """One row per video (prompt), one column per chosen frame: [rows*H, cols*W, 3] uint8."""
    if not videos:
        raise ValueError("contact_sheet needs at least one video")
    cols = sheet_columns(videos[0].shape[0])
    rows = [np.concatenate([to_uint8(v)[i] for i in cols], axis=1) for v in videos]
    return np.concatenate(rows, axis=0)
