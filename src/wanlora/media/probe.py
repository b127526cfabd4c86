"""What a media file is: kind, frame rate, frame count, displayed size and rotation.

Probing decodes the first frame instead of trusting the container header alone: a text file
renamed to .mp4, an audio-only file or a stream whose codec is missing all open "fine" as
containers and only fail when a frame is asked for. A failure becomes a `MediaError` carrying a
reason and a fix, which the trim stage turns into a reported skip.

PyAV is the main backend; OpenCV is the fallback for the rare file PyAV refuses but OpenCV's own
demuxers read. Images go through Pillow, which applies EXIF orientation like every viewer does.

Rotation is recorded as PyAV reports it (`VideoFrame.rotation`, the ffmpeg display matrix):
degrees counter-clockwise that the coded frame turns for display, normalised to 0/90/180/270.
A phone's portrait clip (legacy `rotate=90` tag) reads as 270. Sizes are after that rotation.

Size limits (`MAX_SIDE`, `MAX_PIXELS`) are checked from headers before any frame is decoded: a
24 KB PNG can claim 20000x10000 pixels (PIL's `DecompressionBombError`, which is not an OSError,
used to escape as a traceback) and a 233 KB clip 8192x8192. Over the limit is a bad file like
any other, with the limit in the message, so `on_error: skip` skips it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import cv2
from PIL import Image, UnidentifiedImageError

VIDEO_EXT = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_EXT = frozenset({".jpg", ".jpeg", ".png", ".webp"})

# EXIF orientation tag -> counter-clockwise display rotation (mirrored variants keep their turn;
# decoding applies the full transpose through Pillow, so the mirror is still honoured).
_EXIF_ROTATION = {1: 0, 2: 0, 3: 180, 4: 180, 5: 270, 6: 270, 7: 90, 8: 90}

#: Largest frame side and area we decode (8192x8192 still passes: 8K video is 7680x4320). A
#: training bucket is at most ~1280 px a side, so anything bigger is only shrunk anyway.
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192
_TOO_BIG_FIX = ("downscale it first (e.g. `ffmpeg -i IN -vf scale=-2:2160 OUT`, or any image editor) "
                "or move it out of the dataset folder")

REENCODE_FIX = "re-export it as H.264 .mp4 (e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`) or delete it"


class MediaError(ValueError):
    """A file that cannot be used, with why and what to do about it."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}. Fix: {fix}")
        self.reason = reason
        self.fix = fix


@dataclass(frozen=True)
class MediaInfo:
    kind: Literal["video", "image"]
    fps: float
    frames: int
    width: int  # displayed, after rotation
    height: int
    rotation: int  # degrees counter-clockwise, 0/90/180/270
    backend: Literal["pyav", "opencv", "pillow"]

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def media_kind(path: Path) -> Literal["video", "image"] | None:
    ext = path.suffix.lower()
    return "video" if ext in VIDEO_EXT else "image" if ext in IMAGE_EXT else None


def normalise_rotation(degrees: float) -> int:
    """Snap a display-matrix angle to 0/90/180/270 (phones write exact multiples; -90 means 270)."""
    return int(round(degrees / 90.0)) % 4 * 90


def displayed_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    return (height, width) if rotation in (90, 270) else (width, height)


def check_size(width: int, height: int) -> None:
    """MediaError (with the limits) for a frame over `MAX_SIDE` or `MAX_PIXELS`."""
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise MediaError(
            f"{width}x{height} is over the size limit ({MAX_SIDE} px a side, {MAX_PIXELS:,} pixels)", _TOO_BIG_FIX
        )


def probe(path: str | Path, backend: Literal["auto", "pyav", "opencv"] = "auto") -> MediaInfo:
    """Probe one file; raise MediaError (reason, fix) if it is unusable."""
    path = Path(path)
    kind = media_kind(path)
    if kind is None:
        raise MediaError(
            f"unsupported file type '{path.suffix or '(none)'}'",
            "convert videos to .mp4 and images to .png/.jpg, or move the file out of the dataset folder",
        )
    size = path.stat().st_size
    if size == 0:
        raise MediaError("empty file (0 bytes)", "copy the file again from its source, or delete it")
    if kind == "image":
        return _probe_image(path)
    if backend in ("auto", "pyav"):
        try:
            return _probe_pyav(path)
        except MediaError as err:
            if backend == "pyav":
                raise
            first = err
    else:
        first = None
    try:
        return _probe_opencv(path)
    except MediaError:
        if first is not None:
            raise first from None  # PyAV's message is the more precise one
        raise


def open_image(path: Path) -> Image.Image:
    """Pillow's lazy open (header only), refusing sizes over our limits before any pixel is
    decoded. PIL's own bomb check (an error at twice its MAX_IMAGE_PIXELS, a warning below) is
    superseded by ours, which is lower and names the limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise MediaError(f"image is over the size limit ({MAX_SIDE} px a side, {MAX_PIXELS:,} pixels)",
                         _TOO_BIG_FIX) from None
    try:
        check_size(*im.size)
    except MediaError:
        im.close()
        raise
    return im


def _probe_image(path: Path) -> MediaInfo:
    try:
        with open_image(path) as im:
            im.verify()  # reads the whole stream: catches truncated files
        with open_image(path) as im:
            im.load()  # verify() checks the structure only: a damaged JPEG body fails here, not in trim
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise MediaError(f"not a readable image ({err})", "re-save it as .png or .jpg, or delete it") from None
    rotation = _EXIF_ROTATION.get(int(orientation), 0)
    dw, dh = displayed_size(w, h, rotation)
    return MediaInfo("image", 0.0, 1, dw, dh, rotation, "pillow")


def _probe_pyav(path: Path) -> MediaInfo:
    try:
        container = av.open(str(path), metadata_errors="replace")  # corrupt or Latin-1 tags are not fatal
    except av.error.FFmpegError as err:
        if _mp4_cut_short(path):
            raise MediaError(
                "incomplete MP4: a box runs past the end of the file or the index ('moov') is missing, "
                "so the copy or download was cut short",
                "copy or download the file again",
            ) from None
        raise MediaError(_ffmpeg_reason(err), REENCODE_FIX) from None
    with container:
        if not container.streams.video:
            what = "audio-only file" if container.streams.audio else "no video stream"
            raise MediaError(what, "export the video track as .mp4, or delete the file")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not (fps > 0 and math.isfinite(fps)):
            raise MediaError("frame rate unknown", REENCODE_FIX)
        if stream.codec_context is not None:  # None without a decoder: the decode below reports it
            check_size(stream.codec_context.width, stream.codec_context.height)  # before a frame is decoded
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as err:
            raise MediaError(f"first frame cannot be decoded ({_ffmpeg_reason(err)})", REENCODE_FIX) from None
        if first is None:
            raise MediaError("video stream has no decodable frames (truncated?)", REENCODE_FIX)
        frames = stream.frames
        if not frames:  # mkv/webm carry no count: estimate; the trim scan of the end corrects it
            seconds = (
                float(stream.duration * stream.time_base)
                if stream.duration
                else (container.duration or 0) / av.time_base
            )
            frames = max(1, int(round(seconds * fps)))
        rotation = normalise_rotation(first.rotation or 0)
        w, h = displayed_size(first.width, first.height, rotation)
    check_size(w, h)
    return MediaInfo("video", fps, int(frames), w, h, rotation, "pyav")


def _probe_opencv(path: Path) -> MediaInfo:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError("not a readable video (neither PyAV nor OpenCV can open it)", REENCODE_FIX)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        check_size(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0))
        ok, frame = cap.read()
        if not ok or frame is None:
            raise MediaError("video opens but no frame can be decoded", REENCODE_FIX)
        if not (fps > 0 and frames > 0):
            raise MediaError("frame rate or frame count unknown", REENCODE_FIX)
        # OpenCV turns frames upright itself (CAP_PROP_ORIENTATION_AUTO), so the decoded size is displayed.
        rotation = normalise_rotation(-cap.get(cv2.CAP_PROP_ORIENTATION_META))
        h, w = frame.shape[:2]
    finally:
        cap.release()
    check_size(w, h)
    return MediaInfo("video", fps, frames, w, h, rotation, "opencv")


def _mp4_cut_short(path: Path) -> bool:
    """True if `path` starts like an MP4/MOV but its top-level boxes end early or lack 'moov'.

    Reads only the 8-16 byte box headers, hopping from box to box, so it costs nothing on big files.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or head[4:8] != b"ftyp":
            return False
        pos, seen = 0, set()
        while pos + 8 <= size:
            f.seek(pos)
            header = f.read(16)
            box, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if box == 1 and len(header) == 16:
                box = int.from_bytes(header[8:16], "big")
            elif box == 0:
                box = size - pos
            if box < 8 or pos + box > size:
                return True
            seen.add(kind)
            pos += box
    return b"moov" not in seen


def _ffmpeg_reason(err: Exception) -> str:
    """FFmpeg's own words, shortened: 'Invalid data found when processing input' and the like."""
    msg = getattr(err, "strerror", None) or str(err)
    return f"cannot be decoded: {msg}"
