"""The dataset review page: every sample as trained, its caption and origin, every problem; offline."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from wanlora.config import AutocaptionConfig, DatasetConfig, DopConfig, JobConfig
from wanlora.data import autocaption, buckets, captions, review
from wanlora.data.scan import run_stage as scan_stage
from wanlora.io import read_jsonl
from wanlora.media.decode import read_frames
from wanlora.media.synth import ClipSpec, make_clip
from wanlora.media.trim import run_stage as trim_stage
from wanlora.models.latents import load_frames
from wanlora.stages.review import inputs

CHROMIUM = Path("/usr/bin/chromium")
DS = {"main": DatasetConfig(folder="data/raw", captions={"default_caption": "a plain clip"},
                            bucket={"resolutions": [64], "num_frames": [9]})}


class Fixed:
    def __init__(self, text: str):
        self.text = text

    def __call__(self, frames, instruction):
        return self.text

    def close(self):
        pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Three clips (caption file, auto caption, default caption), a letterboxed intro, one bad file."""
    ws = tmp_path_factory.mktemp("review")
    raw = ws / "data/raw"
    raw.mkdir(parents=True)
    make_clip(raw / "filed.mp4", ClipSpec(96, 64, 16, 24, intro="black", intro_frames=8, bars=(0, 8), seed=1))
    (raw / "filed.txt").write_text("[trigger] walking past a wall\n", encoding="utf-8")
    make_clip(raw / "auto.mp4", ClipSpec(64, 64, 16, 24, seed=2))
    make_clip(raw / "plain.mp4", ClipSpec(64, 64, 16, 24, seed=3))
    (raw / "empty.mp4").write_bytes(b"")
    scan_stage(DS, ws, ws / "data/index")
    trim_stage(DS, ws, ws / "data/trimmed", index=ws / "data/index/media.jsonl")
    buckets.run_stage(DS, ws / "data/trimmed/clips.jsonl", ws / "data/buckets")
    # plain.mp4 gets a refusal, so it falls back to the default caption.
    texts = iter(["a figure crossing a sunlit courtyard", "I cannot describe this video"])

    class Seq(Fixed):
        def __call__(self, frames, instruction):
            return next(texts)

    autocaption.run_stage(ws / "data/trimmed/clips.jsonl", ws / "data/index/captions.jsonl", DS, AutocaptionConfig(frames=2), ws,
                          ws / "data/autocaptions", ws / "scratch/autocaptions", "fake@main", "fake",
                          lambda: Seq(""), read_frames, lambda t: len(t.split()))
    captions.run_stage(JobConfig(trigger_word="zqx"), DS, DopConfig(), ws / "data/trimmed/clips.jsonl",
                       ws / "data/buckets/samples.jsonl", ws / "data/index/captions.jsonl", ws, ws / "data/captions", lambda t: len(t.split()),
                       autocaptions=ws / "data/autocaptions/captions.jsonl")
    review.run_stage(ws, inputs(ws), ws / "data/review")
    return ws


def test_every_sample_with_caption_origin_and_problems(workspace):
    html = (workspace / "data/review/index.html").read_text(encoding="utf-8")
    samples = read_jsonl(workspace / "data/buckets/samples.jsonl")
    assert sorted(re.findall(r"data-sample='([^']+)'", html)) == sorted(s["id"] for s in samples)
    assert {s["clip_id"] for s in samples} == {"main/filed.mp4", "main/auto.mp4", "main/plain.mp4"}
    assert "zqx walking past a wall" in html and "your caption file" in html
    assert "zqx a figure crossing a sunlit courtyard" in html and "data/autocaptions/main/auto.txt" in html
    assert "zqx a plain clip" in html and "default caption" in html
    assert "DOP variant: person walking past a wall" in html
    # Every problem of the data stages, with its fix: the bad file and the refused auto caption.
    assert "data/raw/empty.mp4" in html and "empty file" in html
    assert "the captioner refused" in html and "write plain.txt beside the clip yourself" in html
    assert "http://" not in html and "https://" not in html  # offline: nothing to fetch


def test_a_held_out_clip_is_shown_but_marked_not_trained(workspace, tmp_path):
    """The split stage's held-out clips reach no batch: the page shows their samples (their captions
    still matter to the validation loss) but says so, and does not count them as training samples."""
    samples = read_jsonl(workspace / "data/buckets/samples.jsonl")
    html = review.render(workspace, inputs(workspace), frozenset({"main/plain.mp4"}))
    held = sorted(re.findall(r"data-sample='([^']+)' data-held-out", html))
    assert held == sorted(s["id"] for s in samples if s["clip_id"] == "main/plain.mp4") and held
    assert sorted(re.findall(r"data-sample='([^']+)'", html)) == sorted(s["id"] for s in samples)
    n_train = sum(s["clip_id"] != "main/plain.mp4" for s in samples)
    assert f"{n_train} training samples from 2 clips, and {len(held)} sample(s) of 1 clip(s) held out" in html
    assert "1 auto caption, 1 your caption file" in html  # the default-captioned clip is the held-out one
    assert html.count("not trained: held out for validation") == len(held)


def test_frames_are_the_trained_pixels(workspace):
    """The page's first frame of the letterboxed clip is load_frames' output (trim, crop, resize)."""
    html = (workspace / "data/review/index.html").read_text(encoding="utf-8")
    sample = next(s for s in read_jsonl(workspace / "data/buckets/samples.jsonl") if s["clip_id"] == "main/filed.mp4")
    block = html.split(f"data-sample='{sample['id']}'")[1]
    first = re.search(r'src="data:image/png;base64,([^"]+)"', block).group(1)
    shown = cv2.imdecode(np.frombuffer(base64.b64decode(first), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    pixels = load_frames({**sample, "frame_indices": sample["frame_indices"][:1], "num_frames": 1}, workspace)
    trained = ((pixels[:, 0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert shown.shape == (sample["height"], sample["width"], 3)
    assert np.array_equal(shown, trained)
    assert sample["frame_indices"][0] >= 8  # after the black intro
    assert "kept frames 8&ndash;32 of 32" in block


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed")
def test_review_page_screenshot_is_not_blank(workspace, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,1400", (workspace / "data/review/index.html").as_uri()], check=True,
                   timeout=120, capture_output=True)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.std() > 10 and (img.mean(axis=2) < 128).mean() > 0.01
    saturated = (img.max(axis=2) - img.min(axis=2)) > 80  # the coloured frames rendered, not broken images
    assert saturated.mean() > 0.01


def test_evaluate_report_links_to_the_review_page(workspace):
    """data/eval/report.html links ../review/index.html, which is where the review stage writes."""
    from wanlora.evaluate.report import render_report

    from wanlora.data.split import NONE, Split

    html = render_report("demo", ["a prompt"], [], Split(NONE, "no clips", (), (), ()), {}, {},
                         {"clips": 3, "skipped": 1, "seconds": 4.0, "buckets": [], "caption_problems": []})
    href = re.search(r'<a id="review" href="([^"]+)"', html).group(1)
    (workspace / "data/eval").mkdir(exist_ok=True)
    assert (workspace / "data/eval" / href).resolve() == (workspace / "data/review/index.html").resolve()
    assert (workspace / "data/eval" / href).is_file()
