"""Probing and decoding: sizes, rates, rotation, and a clear MediaError for every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _helpers import scan_index, write_audio_only
from wanlora.media.decode import iter_frames, read_frames
from wanlora.media.probe import MediaError, normalise_rotation, probe
from wanlora.media.synth import ClipSpec, make_clip, write_image, write_video


def test_probe_reads_rate_count_and_size(tmp_path: Path) -> None:
    make_clip(tmp_path / "a.mp4", ClipSpec(width=96, height=64, fps=24, moving=30))
    info = probe(tmp_path / "a.mp4")
    assert (info.kind, info.fps, info.frames, info.width, info.height, info.rotation) == ("video", 24.0, 30, 96, 64, 0)
    assert info.backend == "pyav"
    assert info.duration == pytest.approx(1.25)


def test_odd_size_probes_and_decodes(tmp_path: Path) -> None:
    make_clip(tmp_path / "odd.mp4", ClipSpec(width=97, height=61, fps=16, moving=10))
    info = probe(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.frames) == (97, 61, 10)
    assert read_frames(tmp_path / "odd.mp4", [0, 9], info).shape == (2, 61, 97, 3)


def test_rotation_metadata_gives_displayed_size_and_upright_frames(tmp_path: Path) -> None:
    # coded 64 wide x 32 high, a white stripe on the left 8 columns; displayed turned 90 deg CCW
    coded = np.zeros((32, 64, 3), np.uint8)
    coded[:, :8] = 255
    write_video(tmp_path / "r.mp4", [coded] * 5, 24, rotation=90)
    info = probe(tmp_path / "r.mp4")
    assert (info.rotation, info.width, info.height) == (90, 32, 64)
    frame = read_frames(tmp_path / "r.mp4", [2], info)[0]
    assert frame.shape == (64, 32, 3)
    # a CCW turn moves the left columns to the bottom rows
    assert frame[-6:].mean() > 200 and frame[:-10].mean() < 30
    # OpenCV turns frames itself; the fallback must agree on the angle and the picture
    cv_info = probe(tmp_path / "r.mp4", backend="opencv")
    assert (cv_info.rotation, cv_info.width, cv_info.height) == (90, 32, 64)
    assert np.abs(read_frames(tmp_path / "r.mp4", [2], cv_info)[0].astype(int) - frame).mean() < 3


@pytest.mark.parametrize(("angle", "expected"), [(0, 0), (90, 90), (-90, 270), (180, 180), (-180, 180), (269.6, 270)])
def test_normalise_rotation(angle: float, expected: int) -> None:
    assert normalise_rotation(angle) == expected


def test_exif_orientation_of_images(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "p.jpg", exif=exif)
    info = probe(tmp_path / "p.jpg")
    assert (info.kind, info.width, info.height, info.rotation, info.frames) == ("image", 20, 40, 270, 1)
    assert read_frames(tmp_path / "p.jpg", [0], info).shape == (1, 40, 20, 3)


def test_read_frames_follows_requested_order_and_repeats(tmp_path: Path) -> None:
    # frame i is uniformly grey level 10*i, so each returned frame names its own index
    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(20)]
    write_video(tmp_path / "g.mp4", frames, 16, gop=4)
    got = read_frames(tmp_path / "g.mp4", [15, 3, 3, 19])
    assert [round(float(f.mean()) / 10) for f in got] == [15, 3, 3, 19]


def test_seeking_gives_the_same_numbering_as_decoding_from_the_start(tmp_path: Path) -> None:
    frames = [np.full((32, 32, 3), 5 * i, np.uint8) for i in range(40)]
    write_video(tmp_path / "s.mp4", frames, 24, gop=6)
    info = probe(tmp_path / "s.mp4")
    whole = dict(iter_frames(tmp_path / "s.mp4", info, gray=True))
    tail = dict(iter_frames(tmp_path / "s.mp4", info, 27, 33, gray=True))
    assert sorted(tail) == list(range(27, 33))
    for i, g in tail.items():
        assert np.array_equal(g, whole[i])


def test_opencv_backend_agrees_with_pyav(tmp_path: Path) -> None:
    make_clip(tmp_path / "a.mp4", ClipSpec(width=64, height=48, fps=24, moving=12))
    av_info = probe(tmp_path / "a.mp4")
    cv_info = probe(tmp_path / "a.mp4", backend="opencv")
    assert cv_info.backend == "opencv"
    assert (cv_info.fps, cv_info.frames, cv_info.width, cv_info.height) == (24.0, 12, 64, 48)
    a = read_frames(tmp_path / "a.mp4", [0, 5, 11], av_info).astype(int)
    b = read_frames(tmp_path / "a.mp4", [0, 5, 11], cv_info).astype(int)
    assert np.abs(a - b).mean() < 3  # same decoder underneath; only colour conversion differs


def test_webm_without_frame_count_is_estimated(tmp_path: Path) -> None:
    frames = [np.full((32, 32, 3), 4 * i, np.uint8) for i in range(24)]
    write_video(tmp_path / "w.webm", frames, 24, codec="libvpx-vp9")
    info = probe(tmp_path / "w.webm")
    assert abs(info.frames - 24) <= 1
    assert len(list(iter_frames(tmp_path / "w.webm", info, gray=True))) == 24


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("zero.mp4", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        ("text.mp4", lambda p: p.write_text("just some notes\n"), "cannot be decoded"),
        ("audio.mp4", write_audio_only, "audio-only file"),
        ("clip.gif", lambda p: p.write_bytes(b"GIF89a"), "unsupported file type '.gif'"),
        ("bad.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "not a readable image"),
    ],
)
def test_bad_files_raise_media_error_with_reason_and_fix(tmp_path: Path, name: str, make, reason: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(MediaError) as err:
        probe(path)
    assert reason in err.value.reason
    assert err.value.fix  # every problem says what to do


def test_truncated_mp4_without_index_is_reported(tmp_path: Path) -> None:
    make_clip(tmp_path / "a.mp4", ClipSpec(moving=30))
    data = (tmp_path / "a.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index ('moov') sits at the end
    with pytest.raises(MediaError, match="incomplete MP4") as err:
        probe(tmp_path / "cut.mp4")
    assert err.value.fix == "copy or download the file again"


def test_images_probe_with_size(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((30, 50, 3), np.uint8))
    info = probe(tmp_path / "a.png")
    assert (info.kind, info.width, info.height, info.frames, info.rotation) == ("image", 50, 30, 1, 0)


def test_keyframe_near_returns_a_keyframe_inside_the_range(tmp_path: Path) -> None:
    import av

    from wanlora.media.decode import keyframe_near

    make_clip(tmp_path / "k.mp4", ClipSpec(width=48, height=32, moving=60, seed=3), gop=10)
    info = probe(tmp_path / "k.mp4")
    with av.open(str(tmp_path / "k.mp4")) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    assert len(keys) >= 4 and keys[0] == 0  # the encoder may add keyframes at scene changes
    full = dict(iter_frames(tmp_path / "k.mp4", info, gray=True))
    for target in (15, 33, 47):
        before = max(k for k in keys if k <= target)
        idx, gray = keyframe_near(tmp_path / "k.mp4", info, target, 0, 60)
        assert idx == before
        assert np.array_equal(gray, full[idx])
        # the keyframe before is outside [before + 1, 60): the next one is returned, or None
        after = [k for k in keys if k > before]
        got = keyframe_near(tmp_path / "k.mp4", info, target, before + 1, 60)
        assert (got[0] if got else None) == (after[0] if after else None)


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit all-black PNG of any size, written without holding its pixels: the review's
    24 KB file that claims 20000x10000."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_image_bomb_is_a_media_error_naming_the_limit(tmp_path: Path) -> None:
    bomb = _bomb_png(tmp_path / "bomb.png", 20000, 10000)
    assert bomb.stat().st_size < 64_000
    with pytest.raises(MediaError, match=r"over the size limit \(16384 px a side, 67,108,864 pixels\)") as err:
        probe(bomb)  # was PIL's DecompressionBombError, which is no OSError
    assert "downscale it" in err.value.fix
    # under PIL's own limits, but over ours: the exact size is named
    with pytest.raises(MediaError, match=r"12000x6000 is over the size limit"):
        probe(_bomb_png(tmp_path / "big.png", 12000, 6000))
    with pytest.raises(MediaError, match=r"20000x64 is over the size limit"):
        probe(_bomb_png(tmp_path / "long.png", 20000, 64))  # few pixels, too long a side
    assert probe(_bomb_png(tmp_path / "ok.png", 4096, 2048)).width == 4096


def test_image_bomb_is_skipped_by_the_trim_stage(tmp_path: Path) -> None:
    """The review's experiment: the bomb aborted the trim stage with a traceback even with
    on_error: skip. Now it is one skipped file, the good clip goes on."""
    import json

    from wanlora.config import DatasetConfig
    from wanlora.io import read_jsonl
    from wanlora.media import trim

    raw = tmp_path / "raw"
    raw.mkdir()
    make_clip(raw / "good.mp4", ClipSpec(moving=24))
    _bomb_png(raw / "bomb.png", 20000, 10000)
    ds = {"d": DatasetConfig(folder="raw", on_error="skip")}
    trim.run_stage(ds, tmp_path, tmp_path / "out", index=scan_index(ds, tmp_path))
    clips = {c["id"]: c for c in read_jsonl(tmp_path / "out/clips.jsonl")}
    assert clips["d/good.mp4"]["status"] == "ok"
    assert clips["d/bomb.png"]["status"] == "skipped"
    assert "over the size limit (16384 px a side" in clips["d/bomb.png"]["reason"]
    assert json.loads((tmp_path / "out/problems.json").read_text())["count"] == 1
