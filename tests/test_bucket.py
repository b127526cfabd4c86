"""Bucketing: sizes, frame counts and source frame indices as pure functions; the stage's outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import by_id, scan_index
from wanlora.config import BucketConfig, DatasetConfig
from wanlora.data.buckets import (
    bucket_sizes,
    choose_bucket,
    choose_buckets,
    choose_frames,
    fit_crop,
    frame_indices,
    plan_clip,
    run_stage,
    time_scale,
    window_span,
)
from wanlora.io import read_jsonl, write_jsonl
from wanlora.media import trim
from wanlora.media.synth import make_demo_raw
from wanlora.report import InputError


@pytest.mark.parametrize("res", [256, 512, 768])
def test_bucket_sizes_are_aligned_and_within_area(res: int) -> None:
    sizes = bucket_sizes(res * res)
    assert (res, res) in sizes
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= res * res for w, h in sizes)
    assert all(max(w / h, h / w) <= 3.0 for w, h in sizes)
    assert len(sizes) > 10  # several aspect ratios


@pytest.mark.parametrize(
    ("src", "resolutions", "upscale", "expected"),
    [
        ((1280, 720), [512], False, (672, 384)),  # 16:9 -> 1.75, the nearest aligned ratio
        ((720, 1280), [512], False, (384, 672)),  # portrait mirrors landscape
        ((1024, 1024), [256, 512, 768], False, (768, 768)),  # largest that fits
        ((600, 600), [512, 768], False, (512, 512)),  # 768 would upscale
        ((600, 600), [512, 768], True, (768, 768)),
        ((300, 200), [256, 512], False, (288, 192)),  # smaller than 256 x 1.5: keeps its own area
        ((97, 61), [512], False, (80, 48)),
        ((128, 96), [64], False, (80, 48)),  # AI Toolkit's 4:3 at 64 -> 80x48 (area 4096 max)
        ((15, 200), [512], False, None),  # narrower than 16 px: no bucket
    ],
)
def test_choose_bucket(src, resolutions, upscale, expected) -> None:
    assert choose_bucket(*src, resolutions, upscale) == expected


def test_choose_bucket_never_upscales_and_keeps_aspect() -> None:
    for w in range(40, 2000, 37):
        for h in range(40, 1200, 53):
            got = choose_bucket(w, h, [256, 512], False)
            bw, bh = got
            assert bw <= w and bh <= h and bw % 16 == 0 and bh % 16 == 0
            if min(w, h) >= 64 and max(w / h, h / w) <= 2.5:  # 16-px steps limit accuracy on tiny sides
                assert abs(math.log((bw / bh) / (w / h))) < 0.25, (w, h, got)


def test_fit_crop_centres_the_bucket_aspect_inside_the_letterbox_crop() -> None:
    assert fit_crop([0, 12, 128, 72], 112, 64) == [1, 12, 126, 72]  # wider source: trim the sides
    assert fit_crop([10, 0, 100, 100], 64, 32) == [10, 25, 100, 50]  # taller source: trim top and bottom


def test_spread_indices_cover_the_kept_range() -> None:
    assert frame_indices(10, 58, 24, 9, "spread") == [[10, 16, 22, 28, 34, 39, 45, 51, 57]]
    assert frame_indices(0, 5, 24, 5, "spread") == [[0, 1, 2, 3, 4]]
    assert frame_indices(4, 11, 24, 1, "spread") == [[7]]


def test_window_indices_resample_by_time() -> None:
    # 24 fps source at 16 fps: 1.5 source frames per model frame, rounded half up
    assert frame_indices(0, 100, 24, 5, "window", target_fps=16, windows=1) == [[46, 48, 49, 51, 52]]  # centred: starts at (100 - 7) // 2
    # 30 fps: frame i at i/16 s -> round(i * 1.875)
    assert frame_indices(0, 16, 30, 9, "window", target_fps=16) == [[0, 2, 4, 6, 8, 9, 11, 13, 15]]
    # 16 fps source: contiguous frames
    assert frame_indices(3, 12, 16, 9, "window", target_fps=16) == [[3, 4, 5, 6, 7, 8, 9, 10, 11]]
    # 8 fps source at 16 fps: frames repeat (time-based upsampling)
    assert frame_indices(0, 5, 8, 9, "window", target_fps=16) == [[0, 1, 1, 2, 2, 3, 3, 4, 4]]


def test_windows_are_placed_uniformly_and_stay_inside() -> None:
    windows = frame_indices(10, 110, 24, 9, "window", target_fps=16, windows=3)
    assert [w[0] for w in windows] == [10, 54, 97]  # the last window ends on the last kept frame
    assert windows[-1][-1] == 109
    assert window_span(9, 24, 16) == 13
    # a range that holds exactly one window gives one window, not three copies
    assert frame_indices(0, 13, 24, 9, "window", target_fps=16, windows=3) == [[0, 2, 3, 5, 6, 8, 9, 11, 12]]


def test_too_short_raises() -> None:
    with pytest.raises(ValueError, match="12 kept frames cannot hold 9 frames in window mode"):
        frame_indices(0, 12, 24, 9, "window", target_fps=16)


def test_choose_frames_takes_the_largest_that_fits() -> None:
    spread = BucketConfig(num_frames=[9, 17, 33], frame_sampling="spread", fps=16)
    assert choose_frames(0, 20, 24, spread) == 17
    assert choose_frames(0, 33, 24, spread) == 33
    assert choose_frames(0, 8, 24, spread) is None
    window = BucketConfig(num_frames=[9, 17, 33], frame_sampling="window", fps=16)
    assert choose_frames(0, 25, 24, window) == 17  # 17 frames at 16 fps span 25 source frames
    assert choose_frames(0, 24, 24, window) == 9


# ------------------------------------------------------------- true speed and every resolution
def test_default_keeps_16_fps_on_an_8_s_clip_at_24_fps() -> None:
    """An 8-s 24-fps clip spread over 33 frames would play 4x too fast; the default takes windows
    at 16 fps that cover the kept range instead (AI Toolkit #421, musubi-tuner #567: "motion is sped up")."""
    clip = _clip("long.mp4", keep_start=0, keep_end=192, frames=192, width=512, height=512, crop=[0, 0, 512, 512])
    samples, problem = plan_clip(clip, DatasetConfig())
    assert problem is None
    assert len(samples) == 4  # 192 kept frames / 49 per 33-frame window at 16 fps -> 4 windows
    for s in samples:
        idx = s["frame_indices"]
        assert s["effective_fps"] == 16.0 and s["time_scale"] == 1.0
        assert (idx[-1] - idx[0]) / 24 == pytest.approx(32 / 16)  # 33 frames at 16 fps span 2 s of the clip
    assert samples[0]["frame_indices"][0] == 0 and samples[-1]["frame_indices"][-1] == 191  # the whole range covered
    spread, _ = plan_clip(clip, DatasetConfig(bucket=BucketConfig(frame_sampling="spread")))
    assert [s["time_scale"] for s in spread] == [pytest.approx(191 / 24 / 2, abs=1e-3)]  # 3.98x too fast
    capped, _ = plan_clip(clip, DatasetConfig(bucket=BucketConfig(windows_per_clip=2)))
    assert [s["frame_indices"][0] for s in capped] == [0, 143]


def test_a_clip_of_exactly_the_buckets_length_spreads_as_one_window() -> None:
    n = window_span(33, 24, 16)  # 49 frames: 33 frames at 16 fps
    auto = frame_indices(5, 5 + n, 24, 33, "auto", target_fps=16)
    assert auto == frame_indices(5, 5 + n, 24, 33, "window", target_fps=16) == frame_indices(5, 5 + n, 24, 33, "spread")
    assert time_scale(auto[0][0], auto[0][-1], 33, 24, 16) == 1.0


def test_auto_spreads_only_within_25_percent_of_true_speed() -> None:
    # 1.25x the bucket's length at 16 fps: 32 model-frame intervals of 1.5 source frames, x1.25 = 60 + 1 frames
    assert frame_indices(0, 61, 24, 33, "auto", target_fps=16) == frame_indices(0, 61, 24, 33, "spread")
    assert len(frame_indices(0, 62, 24, 33, "auto", target_fps=16)) == 2  # beyond: two true-speed windows
    # 0.75x: 37 frames hold 33 spread at 0.75x speed; 36 do not, so 33 frames do not fit at all
    cfg = BucketConfig(num_frames=[17, 33], fps=16)
    assert choose_frames(0, 37, 24, cfg) == 33 and choose_frames(0, 36, 24, cfg) == 17
    assert time_scale(*frame_indices(0, 37, 24, 33, "auto", target_fps=16)[0][::32], 33, 24, 16) == 0.75


def test_every_listed_resolution_the_source_reaches_gets_a_sample() -> None:
    """AI Toolkit trains each clip at every resolution of its list; a 1024x1024 source with
    [512, 768] gives one sample at each (and never an upscaled one)."""
    assert choose_buckets(1024, 1024, [512, 768], False) == [(768, 768), (512, 512)]
    assert choose_buckets(1024, 1024, [512, 768], False, every=False) == [(768, 768)]
    assert choose_buckets(600, 600, [512, 768, 1024], False) == [(512, 512)]
    assert choose_buckets(300, 300, [512, 768], False) == [(288, 288)]  # smaller than all: its own area
    clip = _clip("sq.mp4", width=1024, height=1024, crop=[0, 0, 1024, 1024], keep_start=0, keep_end=49)
    ds = DatasetConfig(bucket=BucketConfig(resolutions=[512, 768]))
    samples, _ = plan_clip(clip, ds)
    assert sorted(s["bucket"] for s in samples) == ["512x512x33", "768x768x33"]
    assert sorted(s["id"] for s in samples) == ["main/sq.mp4@512x512#0", "main/sq.mp4@768x768#0"]
    assert samples[0]["frame_indices"] == samples[1]["frame_indices"]
    largest, _ = plan_clip(clip, DatasetConfig(bucket=BucketConfig(resolutions=[512, 768], every_resolution=False)))
    assert [s["id"] for s in largest] == ["main/sq.mp4#0"]


def test_report_and_histogram_show_the_time_scale_and_warn(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "clips.jsonl", [_clip("long.mp4", keep_start=0, keep_end=192, frames=192)])
    run_stage({"main": DatasetConfig(bucket=BucketConfig(frame_sampling="spread"))}, tmp_path / "clips.jsonl", tmp_path / "o")
    (row,) = json.loads((tmp_path / "o" / "histogram.json").read_text())
    assert row["time_scale_min"] == row["time_scale_max"] == pytest.approx(3.979, abs=1e-3)
    report = (tmp_path / "o" / "report.md").read_text()
    assert "1 sample(s) more than 25% off true speed" in report
    assert "plays its motion 3.979x fast" in report and "| main/long.mp4#0 | 672x384x33 | 0-191 | 4.021 | 3.979 |" in report
    run_stage({"main": DatasetConfig()}, tmp_path / "clips.jsonl", tmp_path / "d")
    assert "off true speed" not in (tmp_path / "d" / "report.md").read_text()


# ---------------------------------------------------------------------------- the stage
def _clip(cid: str, **kw) -> dict:
    rec = {
        "id": f"main/{cid}", "dataset": "main", "path": f"data/raw/{cid}", "sha256": "ab" * 32, "kind": "video",
        "fps": 24.0, "frames": 100, "width": 1280, "height": 720, "rotation": 0, "keep_start": 10, "keep_end": 90,
        "keep_start_s": 10 / 24, "keep_end_s": 90 / 24, "crop": [0, 0, 1280, 720], "caption_path": None,
        "status": "ok", "reason": "", "fix": "",
    }  # fmt: skip
    return {**rec, **kw}


def test_stage_writes_samples_histogram_and_report(tmp_path: Path) -> None:
    manifest = tmp_path / "clips.jsonl"
    write_jsonl(
        manifest,
        [
            _clip("wide.mp4", crop=[0, 90, 1280, 540]),  # letterboxed 2.37:1
            _clip("short.mp4", keep_start=0, keep_end=20),
            _clip("img.png", kind="image", fps=None, frames=1, keep_start=0, keep_end=1, width=640, height=640,
                  crop=[0, 0, 640, 640]),
            _clip("bad.mp4", status="skipped", reason="empty file (0 bytes)", fix="delete it", crop=None),
        ],
    )
    bucket = BucketConfig(resolutions=[256], num_frames=[33, 49], frame_sampling="window", windows_per_clip=2)
    ds = DatasetConfig(bucket=bucket, flip_horizontal=True)
    out = tmp_path / "buckets"
    run_stage({"main": ds}, manifest, out)

    samples = by_id(read_jsonl(out / "samples.jsonl"))
    assert sorted(samples) == [
        "main/img.png#0", "main/img.png#0#f",
        "main/wide.mp4#0", "main/wide.mp4#0#f", "main/wide.mp4#1", "main/wide.mp4#1#f",
    ]  # fmt: skip
    wide = samples["main/wide.mp4#1"]
    assert (wide["width"], wide["height"], wide["num_frames"], wide["bucket"]) == (384, 160, 49, "384x160x49")
    assert wide["frame_indices"][0] == 17 and wide["frame_indices"][-1] == 89  # 49 at 16 fps span 73 frames
    assert wide["crop"] == [0, 93, 1280, 533] and wide["flip"] is False  # 2.37:1 picture, 2.4:1 bucket
    assert samples["main/wide.mp4#1#f"]["flip"] is True
    assert samples["main/wide.mp4#1#f"]["frame_indices"] == wide["frame_indices"]
    img = samples["main/img.png#0"]
    assert (img["bucket"], img["frame_indices"], img["kind"]) == ("256x256x1", [0], "image")

    assert json.loads((out / "histogram.json").read_text()) == [
        {"bucket": "256x256x1", "count": 2, "time_scale_min": None, "time_scale_max": None},
        {"bucket": "384x160x49", "count": 4, "time_scale_min": 1.0, "time_scale_max": 1.0},
    ]
    assert wide["effective_fps"] == 16.0 and wide["time_scale"] == 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 1
    (problem,) = report["problems"]
    assert problem["path"] == "data/raw/short.mp4"
    assert problem["reason"] == (
        "too short: 20 kept frames (0.83 s at 24 fps), but the smallest bucket, 33 frames at 16 fps, needs 49; "
        "13 frames would fit (AI Toolkit would repeat frames; we skip the clip rather than train on a stretched one)"
    )
    assert "add 13 to datasets.main.bucket.num_frames" in problem["fix"]


def test_stage_fails_on_short_clip_when_asked(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "clips.jsonl", [_clip("short.mp4", keep_start=0, keep_end=20)])
    ds = DatasetConfig(on_error="fail")  # spread, 33 frames
    with pytest.raises(InputError, match="data/raw/short.mp4: too short: 20 kept frames"):
        run_stage({"main": ds}, tmp_path / "clips.jsonl", tmp_path / "out")


def test_stale_dataset_name_is_a_clear_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "clips.jsonl", [_clip("a.mp4")])
    with pytest.raises(ValueError, match="dataset 'main', which params.yaml no longer defines"):
        run_stage({"other": DatasetConfig()}, tmp_path / "clips.jsonl", tmp_path / "out")


def test_demo_dataset_through_trim_and_bucket(tmp_path: Path) -> None:
    make_demo_raw(tmp_path / "data" / "raw")
    ds = {"main": DatasetConfig(bucket=BucketConfig(resolutions=[64], num_frames=[9, 17, 33]))}
    trim.run_stage(ds, tmp_path, tmp_path / "trimmed", index=scan_index(ds, tmp_path))
    run_stage(ds, tmp_path / "trimmed" / "clips.jsonl", tmp_path / "buckets")
    samples = by_id(read_jsonl(tmp_path / "buckets" / "samples.jsonl"))
    assert len(samples) == 8  # 6 clips + 2 images; too_short.mp4 is reported instead
    assert samples["main/spin_letterbox.mp4#0"]["bucket"] == "80x48x33"  # 128x72 picture inside the bars
    assert samples["main/walk_black_intro.mp4#0"]["frame_indices"][0] >= 8  # after the black intro
    assert all(s["width"] % 16 == 0 and s["height"] % 16 == 0 and (s["num_frames"] - 1) % 4 == 0 for s in samples.values())
    report = json.loads((tmp_path / "buckets" / "report.json").read_text())
    assert [p["path"] for p in report["problems"]] == ["data/raw/too_short.mp4"]
    assert report["problems"][0]["reason"].startswith("too short: 8 kept frames (0.50 s at 16 fps)")


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 500),
    length=st.integers(1, 600),
    fps=st.sampled_from([8.0, 12.0, 15.0, 16.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 60.0]),
    count=st.sampled_from([1, 5, 9, 17, 33, 49, 81]),
    mode=st.sampled_from(["spread", "window", "auto"]),
    windows=st.integers(1, 5),
)
def test_frame_indices_properties(start, length, fps, count, mode, windows) -> None:
    """Every window has `count` ordered indices inside the kept range; window mode keeps the model's pace."""
    end = start + length
    cfg = BucketConfig(num_frames=[count], frame_sampling=mode, fps=16.0, windows_per_clip=windows)
    fits = choose_frames(start, end, fps, cfg) == count
    if not fits:
        with pytest.raises(ValueError):
            frame_indices(start, end, fps, count, mode, target_fps=16.0, windows=windows)
        return
    got = frame_indices(start, end, fps, count, mode, target_fps=16.0, windows=windows)
    assert 1 <= len(got) <= (1 if mode == "spread" else windows)
    spread = mode == "spread" or (mode == "auto" and count > 1 and got[0][0] == start and got[0][-1] == end - 1)
    for idx in got:
        assert len(idx) == count
        assert all(start <= i < end for i in idx)
        assert idx == sorted(idx)
        if not spread and count > 1:  # source frames advance by fps/16 per model frame, +-1 for rounding
            assert abs((idx[-1] - idx[0]) - (count - 1) * fps / 16.0) <= 1
    if spread and count > 1:
        assert got[0][0] == start and got[0][-1] == end - 1
        if mode == "auto":  # auto spreads only near true speed
            assert abs(time_scale(start, end - 1, count, fps, 16.0) - 1) <= 0.25 + 1e-9
