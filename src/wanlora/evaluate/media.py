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


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 mp4 bytes of [F, H, W, 3] uint8 frames."""
    import av

    frames = to_uint8(frames)
    f, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for frame in frames:
            # Converted here, not left to `stream.encode`: with encode converting, the same frames gave
            # other bytes now and then once the heap had churned (after a TI2V 5B preview; after many
            # mallocs and frees), though the yuv420p pixels it converts to are the same; the cause is
            # somewhere in PyAV 18's encode path, not pinned down. Converting first cured every case we could
            # reproduce alone, but the full test suite still saw it once (test_train_preview_image): open.
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(yuv):
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
