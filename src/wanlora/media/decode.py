"""Decoding frames by index, upright, optionally shrunk and grey: for trim analysis and for the caches.

Why one module: every consumer (trim scans, letterbox sampling, the latent cache) must agree on
what "frame 37" means and on which way is up. Frame indices come from presentation timestamps
(`round(t * fps)`), so a seek into the middle of a long clip lands on the same numbering as a
decode from the start; that is what keeps the trim scan of a clip's end independent of its length.

Shrinking and grey conversion run inside FFmpeg's scaler (PyAV `reformat`), which is several
times cheaper than converting full RGB frames in numpy and then resizing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import ImageOps

from wanlora.media.probe import REENCODE_FIX, MediaError, MediaInfo, displayed_size, open_image, probe

_FRAME_THREADS_MAX_PIXELS = 3840 * 2160


def iter_frames(
    path: str | Path,
    info: MediaInfo,
    start: int = 0,
    stop: int | None = None,
    *,
    gray: bool = False,
    size: tuple[int, int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, frame) for start <= index < stop, upright; uint8 HxW (gray) or HxWx3 RGB.

    `size` is the displayed (width, height) to shrink to with area averaging. Decoding starts at
    the keyframe before `start`, so the cost is the distance to that keyframe, not `start`.
    A decode error mid-stream raises MediaError (a truncated or damaged file).
    """
    path = Path(path)
    if info.kind == "image":
        if start <= 0 and (stop is None or stop > 0):
            yield 0, _prepare(_load_image(path), 0, gray, size, bgr=False)
        return
    if info.backend == "opencv":
        yield from _iter_opencv(path, info, start, stop, gray, size)
    else:
        yield from _iter_pyav(path, info, start, stop, gray, size)


def keyframe_near(path: str | Path, info: MediaInfo, target: int, lo: int, hi: int) -> tuple[int, np.ndarray] | None:
    """A grey keyframe with lo <= index < hi, at or after the one before `target`; None if none.

    Keyframes decode without their neighbours: packets are demuxed (cheap), only the chosen
    keyframe's packet is decoded, and the decoder is flushed at once instead of being fed the rest
    of its GOP. Sampling a few frames of a long clip this way costs a few frame decodes. PyAV only;
    other backends (and streams without packet timestamps) return None.
    """
    if info.kind != "video" or info.backend != "pyav":
        return None
    k = info.rotation // 90
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            stream = container.streams.video[0]
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            container.seek(_seek_ts(stream, t0, target, info.fps), stream=stream, backward=True)
            for packet in container.demux(stream):
                if packet.pts is None or not packet.is_keyframe:
                    continue
                idx = int(round((float(packet.pts * packet.time_base) - t0) * info.fps))
                if idx >= hi:
                    return None
                if idx >= lo:
                    frames = [*stream.decode(packet), *stream.decode(None)]
                    if not frames:
                        return None
                    img = frames[0].to_ndarray(format="gray")
                    return idx, np.ascontiguousarray(np.rot90(img, k=k)) if k else img
    except av.error.FFmpegError:
        return None  # the caller falls back to exact decoding, which reports damage properly
    return None


def _seek_ts(stream, t0: float, index: int, fps: float) -> int:
    """Stream timestamp of frame `index`, rounded (not floored): one tick early would land the
    backward seek on the keyframe before, costing a whole extra GOP of decoding."""
    return int(round((t0 + index / fps) / stream.time_base))


def read_frames(
    path: str | Path,
    indices: Sequence[int],
    info: MediaInfo | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Frames at `indices` (any order, repeats allowed) as uint8 [F, H, W, 3] RGB, displayed size,
    each passed through `transform` (e.g. crop and resize to a bucket) as soon as it is decoded.

    With a transform, memory follows its output, not the source: one source frame is alive at a
    time (an 8192x8192 clip made into a 9-frame 64x64 sample peaked at 3.7 GB above baseline when
    all decoded frames were kept at full size first). One seek to the smallest index, then a
    forward decode to the largest; raises MediaError if an index is never reached (the file ends early).

    Indices are time slots at `info.fps`. A variable-frame-rate stream (phones, screen captures)
    has no frame in some slots: such a slot shows the frame before it, as a player (or FFmpeg's
    fps filter) would, so the decode reaches a little past both ends to find the neighbours.
    """
    path = Path(path)
    info = info or probe(path)
    if not indices:
        raise ValueError("read_frames needs at least one index")
    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    margin = max(2, round(info.fps / 2))
    prev: tuple[int, np.ndarray] | None = None
    for idx, frame in iter_frames(path, info, max(0, min(wanted) - margin), max(wanted) + 1 + margin):
        if transform is not None:
            frame = transform(frame)
        if prev is not None:
            for slot in wanted.intersection(range(prev[0] + 1, idx)).difference(got):
                got[slot] = prev[1]
        if idx in wanted:
            got[idx] = frame
        if len(got) == len(wanted):
            break
        prev = (idx, frame)
    missing = sorted(wanted - set(got))
    if missing:
        raise MediaError(
            f"frames {missing[:5]} of {info.frames} cannot be decoded (file ends early or is damaged)",
            REENCODE_FIX,
        )
    return np.stack([got[i] for i in indices])


def _load_image(path: Path) -> np.ndarray:
    try:
        with open_image(path) as im:  # the probe's size limits: the file may have changed since
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except MediaError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # changed or damaged since it was probed
        raise MediaError(f"image cannot be decoded ({err})", "re-save it as .png or .jpg, or delete it") from None


def _prepare(rgb_or_gray: np.ndarray, rotation: int, gray: bool, size: tuple[int, int] | None, bgr: bool) -> np.ndarray:
    """Rotate upright, convert, resize: the numpy path (images and the OpenCV backend)."""
    img = np.rot90(rgb_or_gray, k=rotation // 90) if rotation else rgb_or_gray
    if gray and img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    elif not gray and bgr:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)
    if size is not None and (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(np.ascontiguousarray(img), size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def _iter_pyav(path: Path, info: MediaInfo, start: int, stop: int | None, gray: bool, size: tuple[int, int] | None):
    fmt = "gray" if gray else "rgb24"
    k = info.rotation // 90
    coded = displayed_size(*size, info.rotation) if size else None
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            stream = container.streams.video[0]
            # frame threading holds a decoded frame per thread: fine at 4K, gigabytes at 8K on many cores
            cc = stream.codec_context
            big = cc is not None and cc.width * cc.height > _FRAME_THREADS_MAX_PIXELS
            stream.thread_type = "SLICE" if big else "AUTO"
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if start > 0:
                container.seek(_seek_ts(stream, t0, start, info.fps), stream=stream, backward=True)
            for n, frame in enumerate(container.decode(stream)):
                if frame.time is not None:
                    idx = int(round((frame.time - t0) * info.fps))
                elif start == 0:
                    idx = n  # no timestamps: count from the start, which is exact without a seek
                else:
                    raise MediaError("frames carry no timestamps, so the file cannot be seeked", REENCODE_FIX)
                if idx < start:
                    continue
                if stop is not None and idx >= stop:
                    return
                if coded:
                    img = frame.reformat(width=coded[0], height=coded[1], format=fmt, interpolation="AREA").to_ndarray()
                else:
                    img = frame.to_ndarray(format=fmt)
                yield idx, np.ascontiguousarray(np.rot90(img, k=k)) if k else img
    except av.error.FFmpegError as err:
        raise MediaError(f"decoding failed mid-stream ({err}); the file is truncated or damaged", REENCODE_FIX) from None


def _iter_opencv(path: Path, info: MediaInfo, start: int, stop: int | None, gray: bool, size: tuple[int, int] | None):
    cap = cv2.VideoCapture(str(path))
    try:
        if start > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        idx = start
        while stop is None or idx < stop:
            ok, frame = cap.read()
            if not ok:
                return
            # OpenCV has already turned the frame upright (CAP_PROP_ORIENTATION_AUTO).
            yield idx, _prepare(frame, 0, gray, size, bgr=True)
            idx += 1
    finally:
        cap.release()
