"""Trim: static intros/outros found within 2 frames, moving content never cut, bars within 4 px,
bad input reported by name, the raw folder left byte-identical."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from _helpers import by_id, folder_hashes, scan_index, write_audio_only
from wanlora.config import DatasetConfig, TrimConfig
from wanlora.io import read_jsonl
from wanlora.media import trim
from wanlora.media.motion import Analysed, StillParams, analyse, analysis_size, motion_score, static_prefix
from wanlora.media.probe import MediaError, probe
from wanlora.media.synth import ClipSpec, make_clip, make_demo_raw, write_video
from wanlora.report import InputError

CASES = {
    "black": ClipSpec(intro="black", intro_frames=10, outro="black", outro_frames=7, seed=1),
    "frozen": ClipSpec(intro="frozen", intro_frames=12, outro="frozen", outro_frames=12, seed=2),
    "title_noise": ClipSpec(intro="title", intro_frames=24, outro="title", outro_frames=9, seed=3),
    "title_small": ClipSpec(width=64, height=64, intro="title", intro_frames=20, seed=4),
    "fades": ClipSpec(intro="fade", intro_frames=12, outro="fade", outro_frames=12, seed=5),
    "plain": ClipSpec(seed=6),
    "plain_noisy": ClipSpec(noise=6.0, seed=7),
    "hard_cut": ClipSpec(cut_at=20, seed=8),
    "letterbox": ClipSpec(width=128, height=96, bars=(0, 12), intro="black", intro_frames=6, seed=9),
    "pillarbox": ClipSpec(width=128, height=96, bars=(16, 0), outro="frozen", outro_frames=8, seed=10),
    "rotated": ClipSpec(width=96, height=64, bars=(10, 0), rotation=90, intro="frozen", intro_frames=10, seed=11),
    "odd_size": ClipSpec(width=97, height=61, intro="black", intro_frames=5, seed=12),
    "fps30_title": ClipSpec(fps=30, intro="title", intro_frames=30, outro="black", outro_frames=15, seed=13),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_keep_range_and_crop_match_ground_truth(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.mp4"
    truth = make_clip(path, CASES[name])
    info = probe(path)
    cfg = TrimConfig()
    keep = trim.find_keep_range(path, info, cfg)
    assert abs(keep.keep_start - truth["keep_start"]) <= 2, keep.intro
    assert abs(keep.keep_end - truth["keep_end"]) <= 2, keep.outro
    assert keep.frames == truth["frames"]
    if truth["cut_frame"] is not None:  # the cut between two moving shots stays inside the kept range
        assert keep.keep_start < truth["cut_frame"] < keep.keep_end
    if not CASES[name].intro:
        assert keep.keep_start == 0  # nothing static at the start: nothing cut
    if not CASES[name].outro:
        assert keep.keep_end == truth["frames"]
    crop = trim.find_crop(path, info, keep.keep_start, keep.keep_end, cfg.black_level)
    assert np.abs(np.array(crop) - np.array(truth["crop"])).max() <= 4, (crop, truth["crop"])


def test_report_names_what_was_cut(tmp_path: Path) -> None:
    path = tmp_path / "f.mp4"
    make_clip(path, CASES["fades"])
    keep = trim.find_keep_range(path, probe(path), TrimConfig())
    assert keep.intro.fade >= 8 and keep.outro.fade >= 8
    assert trim._describe(keep.intro, 24.0).startswith(f"{keep.keep_start / 24:.2f} s (")


def test_all_static_clip_is_a_problem(tmp_path: Path) -> None:
    frame = np.full((48, 64, 3), 120, np.uint8)
    write_video(tmp_path / "still.mp4", [frame] * 30, 24)
    with pytest.raises(MediaError, match="no motion anywhere"):
        trim.find_keep_range(tmp_path / "still.mp4", probe(tmp_path / "still.mp4"), TrimConfig())


def test_static_longer_than_the_scan_limit_is_cut_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "long_intro.mp4"
    make_clip(path, ClipSpec(fps=16, intro="frozen", intro_frames=40, moving=32, seed=3))
    keep = trim.find_keep_range(path, probe(path), TrimConfig(max_scan_seconds=1.0))
    assert keep.keep_start == 16  # 1 s at 16 fps, not the 40 that are really still
    assert any("max_scan_seconds" in n for n in keep.notes)


def test_trim_disabled_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "b.mp4"
    make_clip(path, CASES["black"])
    keep = trim.find_keep_range(path, probe(path), TrimConfig(enabled=False))
    assert (keep.keep_start, keep.keep_end) == (0, 65)


def test_scan_cost_does_not_grow_with_the_middle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 30 s clip with a short outro decodes about the same frames as a 3 s one."""
    decoded: list[int] = []
    real = trim.iter_frames

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(trim, "iter_frames", counting)
    counts = []
    for seconds in (3, 30):
        path = tmp_path / f"{seconds}.mp4"
        make_clip(path, ClipSpec(width=48, height=32, fps=24, moving=24 * seconds, outro="frozen", outro_frames=12, seed=1))
        decoded.clear()
        keep = trim.find_keep_range(path, probe(path), TrimConfig())
        assert abs(keep.keep_end - 24 * seconds) <= 2
        counts.append(len(decoded))
    assert counts[1] <= counts[0] + 12, counts  # keyframe alignment may add a GOP, not 27 s of frames


# ----------------------------------------------------------------- pure run-length logic
def _frames(levels: list[float], shift: list[int] | None = None) -> list[Analysed]:
    """Analysed frames of a smooth periodic picture (so np.roll has no seam) at a brightness and shift."""
    base = np.tile(120 + 20 * np.sin(np.arange(64, dtype=np.float32) * 2 * np.pi / 64), (32, 1))
    shift = shift or [0] * len(levels)
    pictures = [np.clip(np.roll(base, s, axis=1) * lv / 120.0, 0, 255) for lv, s in zip(levels, shift, strict=True)]
    return [analyse(p.astype(np.uint8)) for p in pictures]


P = StillParams(black_level=16, motion_threshold=2.0, min_static_frames=6)


def test_black_frames_are_static_at_any_length() -> None:
    frames = _frames([0, 0] + [120] * 4, shift=[0, 0, 0, 3, 6, 9])
    out = static_prefix(frames, P)
    assert (out.frames, out.black, out.moving_found) == (2, 2, True)


def test_still_run_shorter_than_the_minimum_is_kept() -> None:
    frames = _frames([120] * 10, shift=[0, 0, 0, 0, 3, 6, 9, 12, 15, 18])  # 4 still frames < 6
    assert static_prefix(frames, P).frames == 0


def test_slow_drift_counts_as_motion() -> None:
    """1 px per frame never differs much from the previous frame, but it does from the run's anchor."""
    frames = _frames([120] * 20, shift=list(range(20)))
    assert motion_score(frames[0], frames[1]) < P.motion_threshold  # each step is below the threshold...
    assert static_prefix(frames, P).frames == 0  # ...yet the picture is moving


def _textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A float picture with detail at several scales, like a real scene."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width), np.float32)
    for cells, amp in ((4, 40.0), (16, 25.0), (64, 15.0)):
        small = rng.uniform(-amp, amp, (max(2, height * cells // width), cells)).astype(np.float32)
        img += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return img + 120


def _analysed_at_decode_size(pictures: list[np.ndarray], width: int, height: int) -> list[Analysed]:
    """Frames as trim sees them: shrunk (area averaging) to analysis_size, then analysed."""
    size = analysis_size(width, height)
    return [analyse(cv2.resize(np.clip(p, 0, 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA)) for p in pictures]


def test_sub_pixel_ease_out_is_motion_though_64_px_frames_look_still() -> None:
    """A camera easing out at 0.4-0.2 px a frame (640 px wide): the blurred 64-px picture moves less
    than noise would, but the drift from the run's anchor at 384 px grows past the run's noise,
    which a held noisy picture's drift does not."""
    base = _textured(704, 272)
    shifts = np.cumsum(np.linspace(0.4, 0.2, 20))
    pictures = [cv2.warpAffine(base, np.float32([[1, 0, -x], [0, 1, 0]]), (640, 272), flags=cv2.INTER_LINEAR) for x in shifts]
    frames = _analysed_at_decode_size(pictures, 640, 272)
    assert max(motion_score(frames[0], f) for f in frames) < P.motion_threshold  # the coarse measure sees nothing
    out = static_prefix(frames, P)
    assert out.frames == 0 and out.moving_found
    # while fresh noise on every frame, and an encoder re-quantizing the held picture once, do not move it
    rng = np.random.default_rng(1)
    base = _textured(640, 360)
    jump = rng.normal(0, 1.0, base.shape).astype(np.float32)
    pictures = [base + rng.normal(0, 3.0, base.shape) + (jump if i >= 8 else 0) for i in range(16)]
    frames = _analysed_at_decode_size(pictures, 640, 360)
    out = static_prefix(frames, P)
    assert out.frames == 16 and out.still == 16 and not out.moving_found


def test_fade_of_a_still_picture_is_static() -> None:
    frames = _frames([20, 40, 60, 80, 100, 120, 120, 120] + [120] * 4, shift=[0] * 8 + [3, 6, 9, 12])
    out = static_prefix(frames, P)
    assert out.frames == 8 and out.fade >= 4 and out.moving_found


# ---------------------------------------------------------------------------- the stage
def _run(tmp_path: Path, datasets: dict[str, DatasetConfig]) -> tuple[dict, dict]:
    out = tmp_path / "data" / "trimmed"
    trim.run_stage(datasets, tmp_path, out, index=scan_index(datasets, tmp_path))
    return by_id(read_jsonl(out / "clips.jsonl")), json.loads((out / "problems.json").read_text())


def test_stage_on_demo_dataset(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "raw"
    truth = make_demo_raw(raw)
    (raw / "sub").mkdir()
    write_audio_only(raw / "sub" / "music.mp4")
    os.symlink("/etc/hostname", raw / "escape.mp4")
    os.symlink(raw / "loop_b.mp4", raw / "loop_a.mp4")
    os.symlink(raw / "loop_a.mp4", raw / "loop_b.mp4")
    os.symlink(raw / "run_cut.mp4", raw / "alias.mp4")  # inside the folder: fine
    before = folder_hashes(raw)

    clips, problems = _run(tmp_path, {"main": DatasetConfig(folder="data/raw")})

    assert folder_hashes(raw) == before  # nothing under raw/ was written
    assert not list(raw.rglob(".*"))  # not even a temp file
    for name, gt in truth["clips"].items():
        rec = clips[f"main/{name}"]
        assert rec["status"] == "ok", rec
        assert abs(rec["keep_start"] - gt["keep_start"]) <= 2 and abs(rec["keep_end"] - gt["keep_end"]) <= 2, (name, rec)
        assert np.abs(np.array(rec["crop"]) - np.array(gt["crop"])).max() <= 4
        assert rec["keep_start_s"] == pytest.approx(rec["keep_start"] / gt["fps"], abs=1e-3)
        assert rec["path"] == f"data/raw/{name}"
        assert len(rec["sha256"]) == 64
    assert "caption_path" not in clips["main/walk_black_intro.mp4"]  # captions pair through the caption index
    assert clips["main/alias.mp4"]["sha256"] == clips["main/run_cut.mp4"]["sha256"]
    img = clips["main/portrait.png"]
    assert (img["kind"], img["frames"], img["width"], img["height"], img["crop"]) == ("image", 1, 64, 96, [0, 0, 64, 96])

    reasons = {p["path"]: p["reason"] for p in problems["problems"]}
    assert reasons["data/raw/empty.mp4"] == "empty file (0 bytes)"
    assert reasons["data/raw/truncated.mp4"].startswith("incomplete MP4")
    assert "cannot be decoded" in reasons["data/raw/notes.mp4"]
    assert reasons["data/raw/sub/music.mp4"] == "audio-only file"
    assert problems["count"] == 4
    # what the folder walk finds is the scan stage's to report: trim reads its index, never the folder
    listed = {p["path"]: p["reason"] for p in json.loads((tmp_path / "data/index/problems.json").read_text())["problems"]}
    assert listed["data/raw/orphan.txt"] == "caption without a matching clip or image"
    assert listed["data/raw/escape.mp4"].startswith("symlink points outside the dataset folder")
    assert listed["data/raw/loop_a.mp4"] == "symlink loop"
    for bad in ("empty.mp4", "truncated.mp4", "notes.mp4", "sub/music.mp4"):
        rec = clips[f"main/{bad}"]
        assert rec["status"] == "skipped" and rec["reason"] and rec["fix"]
    assert "main/escape.mp4" not in clips

    report = (tmp_path / "data" / "trimmed" / "report.md").read_text()
    assert "main/walk_black_intro.mp4" in report and "(8 black frames)" in report
    assert "`data/raw/empty.mp4`: empty file (0 bytes). Fix:" in report
    assert "Seconds trimmed in total:" in report


def test_faststart_truncated_clip_fails_when_decoding_reaches_the_gap(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    from wanlora.media.synth import clip_frames

    write_video(raw / "ok.mp4", clip_frames(ClipSpec(moving=60)), 24, faststart=True)
    data = (raw / "ok.mp4").read_bytes()
    (raw / "ok.mp4").write_bytes(data[: int(len(data) * 0.6)])  # index intact, frames missing
    clips, problems = _run(tmp_path, {"d": DatasetConfig(folder="raw")})
    assert clips["d/ok.mp4"]["status"] == "skipped"
    assert "truncated" in clips["d/ok.mp4"]["reason"]


def test_on_error_fail_stops_and_lists_every_bad_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    make_clip(raw / "good.mp4", ClipSpec(moving=24))
    (raw / "zero.mp4").write_bytes(b"")
    (raw / "fake.mp4").write_text("hello")
    index = scan_index({"d": DatasetConfig(folder="raw")}, tmp_path)  # skip: else scan stops first, on zero.mp4
    with pytest.raises(InputError) as err:
        trim.run_stage({"d": DatasetConfig(folder="raw", on_error="fail")}, tmp_path, tmp_path / "out", index=index)
    msg = str(err.value)
    assert "raw/zero.mp4: empty file (0 bytes)" in msg and "raw/fake.mp4: cannot be decoded" in msg
    assert "2 bad input(s)" in msg
    # the report is still written, so the person can read it
    assert json.loads((tmp_path / "out" / "problems.json").read_text())["count"] == 2


def test_manifest_is_deterministic(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_demo_raw(raw)
    ds = {"d": DatasetConfig(folder="raw")}
    index = scan_index(ds, tmp_path)
    trim.run_stage(ds, tmp_path, tmp_path / "a", index=index)
    trim.run_stage(ds, tmp_path, tmp_path / "b", index=index)
    for name in ("clips.jsonl", "problems.json", "report.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_stage_takes_media_and_hashes_from_the_scan_index(tmp_path: Path) -> None:
    """Trim's media list and hashes are the scan index's rows: it walks and hashes nothing again."""
    raw = tmp_path / "data" / "raw"
    make_clip(raw / "a.mp4", ClipSpec(intro="black", intro_frames=6, seed=1))
    make_clip(raw / "b.mp4", ClipSpec(seed=2))
    (raw / "a.txt").write_text("[trigger] a\n")
    ds = {"main": DatasetConfig(folder="data/raw")}
    index = scan_index(ds, tmp_path)
    trim.run_stage(ds, tmp_path, tmp_path / "indexed", index=index)
    clips = by_id(read_jsonl(tmp_path / "indexed" / "clips.jsonl"))
    assert [(c["id"], c["sha256"]) for c in clips.values()] == [(r["id"], r["sha256"]) for r in read_jsonl(index)]
    assert clips["main/a.mp4"]["keep_start"] == 6


def test_webm_without_a_frame_count_is_trimmed_and_counted(tmp_path: Path) -> None:
    """WebM/MKV headers carry no frame count: the estimate is corrected by the end scan."""
    from wanlora.media.synth import clip_frames

    spec = ClipSpec(width=64, height=48, fps=24, moving=40, intro="black", intro_frames=6, outro="frozen", outro_frames=10)
    write_video(tmp_path / "c.webm", clip_frames(spec), 24, codec="libvpx-vp9")
    info = probe(tmp_path / "c.webm")
    keep = trim.find_keep_range(tmp_path / "c.webm", info, TrimConfig())
    assert keep.frames == 56
    assert abs(keep.keep_start - 6) <= 2 and abs(keep.keep_end - 46) <= 2


def test_detect_crop_needs_bars_dark_in_every_frame() -> None:
    from wanlora.media.letterbox import detect_crop

    rng = np.random.default_rng(0)
    frames = []
    for k in range(4):
        f = np.clip(rng.normal(6, 2, (90, 160)), 0, 255)  # noisy near-black bars
        f[20:70, 8:150] = 40 + 30 * k  # the picture changes from frame to frame
        frames.append(f.astype(np.uint8))
    assert detect_crop(frames, 16) == [8, 20, 142, 50]
    # a dark first row of picture in one frame only is not a bar: the brightest appearance counts
    frames[2][15:20, 8:150] = 200
    assert detect_crop(frames, 16) == [8, 15, 142, 55]
    # a frame that is dark almost everywhere is a dark scene, not bars
    dark = np.zeros((90, 160), np.uint8)
    dark[40:45, 70:80] = 200
    assert detect_crop([dark], 16) == [0, 0, 160, 90]


def test_a_dark_scene_inside_bars_is_picture_not_bar() -> None:
    """A night scene whose darkest columns average below the black level, with texture along them,
    inside flat black letterbox bars: only the flat bars are cut."""
    from wanlora.media.letterbox import detect_crop

    rng = np.random.default_rng(2)
    frames = []
    for k in range(3):
        f = np.zeros((120, 160), np.float32)
        scene = np.clip(rng.normal(12, 6, (80, 160)), 0, 255)  # mean 12 < 16, spread 6
        scene[:, 40:130] += 30 + 5 * k  # a lit shop front
        f[20:100] = scene
        frames.append(f.astype(np.uint8))
    assert detect_crop(frames, 16) == [0, 20, 160, 80]


def test_a_media_index_path_leaving_the_dataset_folder_is_refused(tmp_path: Path) -> None:
    """A media.jsonl swapped on a shared remote cannot point trim at a file outside the dataset."""
    from wanlora.io import ManifestPathError, write_jsonl

    outside = tmp_path / "elsewhere.mp4"
    make_clip(outside, ClipSpec(moving=8))
    (tmp_path / "data/raw").mkdir(parents=True)
    write_jsonl(tmp_path / "media.jsonl", [{"id": "main/a.mp4", "dataset": "main", "path": "data/raw/../../elsewhere.mp4",
                                            "sha256": "0" * 64}])
    with pytest.raises(ManifestPathError, match=r"main/a.mp4: path .* lies outside its dataset folder data/raw"):
        trim.run_stage({"main": DatasetConfig()}, tmp_path, tmp_path / "out", index=tmp_path / "media.jsonl")
    assert not (tmp_path / "out").exists()
