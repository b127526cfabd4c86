"""Previews of the image-to-video models on their tiny versions: I2V A14B from the training clips'
first frames (nothing held out), TI2V 5B from text and from `sample.images` with its one
transformer. Each preview is the evaluate sampler's output for the saved checkpoint from the same
start images, training is untouched, and the live page shows the start images."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _helpers import clip_frames, copy_workspace, make_workspace, ti2v_params, ti2v_workspace, tiny_params, write_clip
from PIL import Image

from wanlora.evaluate import sampling
from wanlora.io import read_jsonl
from wanlora.models.text import run_stage as text_cache
from wanlora.report import InputError
from wanlora.train import loop

PROMPTS = ["sks person waving", "a red ball"]
PREVIEW = {"preview": True, "prompts": PROMPTS, "preview_steps": 2, "preview_num_frames": 5,
           "preview_guidance_scale": 2.0, "fps": 8}
SIZE = {"i2v-a14b": 32, "ti2v-5b": 64}  # TI2V 5B: 32 px a side is one token through its 16x VAE and 2x2 patch
CHROMIUM = Path("/usr/bin/chromium")


def _setup(variant: str, base: Path) -> tuple[Path, Path, dict, object]:
    """A trainable workspace of `variant` with the prompts in its text cache; the preview's sample
    section and the params builder."""
    size, model = SIZE[variant], base / "model"
    if variant == "i2v-a14b":  # start frames: the training clips' own (the split holds nothing out)
        ws = make_workspace(base / "ws", model, variant=variant)
        for i, rec in enumerate(read_jsonl(ws / "data/buckets/samples.jsonl")):
            write_clip(ws / rec["path"], clip_frames(rec["num_frames"], rec["width"], rec["height"], seed=i))
        sample, build = dict(PREVIEW), tiny_params
    else:
        ws = ti2v_workspace(base / "ws", model)
        for i in range(len(PROMPTS)):
            Image.fromarray(clip_frames(1, 80, 64, seed=5 + i)[0]).save(ws / f"start{i}.png")
        sample, build = {**PREVIEW, "images": [f"start{i}.png" for i in range(len(PROMPTS))]}, ti2v_params
    text_cache(root=model, captions_manifest=ws / "data/captions/captions.jsonl", prompts=PROMPTS, trigger="sks",
               dropout=("sks", "person"), out_dir=ws / "data/cache/text", dtype="fp32", quant="none", device="cpu")
    return ws, model, {**sample, "preview_width": size, "preview_height": size}, build


def _loras(ws: Path) -> dict[str, bytes]:
    return {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted((ws / "data/lora").rglob("*.safetensors"))}


@pytest.fixture(scope="module", params=["i2v-a14b", "ti2v-5b"])
def case(request, tmp_path_factory):
    """(variant, model, sample section, params builder, run without previews, run with them)."""
    base = tmp_path_factory.mktemp(request.param)
    ws, model, sample, build = _setup(request.param, base)
    runs = []
    for name, section in (("off", {"preview": False}), ("on", sample)):
        run = copy_workspace(ws, base / name)
        loop.run_stage(build(model, sample=section), run)
        runs.append(run)
    return request.param, model, sample, build, *runs


def _videos(variant: str) -> int:
    return len(PROMPTS) * (2 if variant == "ti2v-5b" else 1)  # TI2V 5B: from text, then from the start image


def test_previews_appear_with_their_start_images(case):
    variant, _, sample, _, _, on = case
    out, size = on / "data/train_live/previews", sample["preview_width"]
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]
    timings = json.loads((on / "data/train_perf/previews.json").read_text())
    assert [t["step"] for t in timings] == [2, 4, 6]
    n = _videos(variant)
    for step in ("step_000002", "step_000006"):
        result = json.loads((out / step / "result.json").read_text())
        assert result["videos"] == [f"prompt_{i:02d}.mp4" for i in range(n)]
        starts = [f"start_{i:02d}.png" for i in range(len(PROMPTS))]
        assert result["starts"] == ([None] * len(PROMPTS) if variant == "ti2v-5b" else []) + starts
        images = [np.asarray(Image.open(out / step / s)) for s in starts]
        assert all(im.shape == (size, size, 3) for im in images) and not np.array_equal(*images)
        assert np.asarray(Image.open(out / step / "contact_sheet.png")).shape == (size * n, size * 5, 3)
    a, b = (np.asarray(Image.open(out / s / "contact_sheet.png")) for s in ("step_000002", "step_000006"))
    assert not np.array_equal(a, b)  # the LoRA trained in between: previews show it


def test_previews_never_change_training(case):
    *_, off, on = case
    assert not (off / "data/train_live/previews").exists()
    assert _loras(off) == _loras(on) and _loras(on)
    assert sorted(p.name for p in (off / "scratch/train").iterdir()) == \
        sorted(p.name for p in (on / "scratch/train").iterdir())  # same run key: previews are not in it


def test_the_preview_is_the_evaluate_sampler_from_evaluates_start_images(case):
    """The step-6 preview equals `sampling.sample_videos` on a freshly loaded base with the saved
    step-6 files, from the start frames evaluate chooses (`start_images.prompt_frames`) at the
    preview size; and those are the start images the preview wrote."""
    from wanlora.data.split import SPLIT_FILE, read_split
    from wanlora.evaluate.media import to_uint8
    from wanlora.evaluate.start_images import prompt_frames
    from wanlora.models.loading import boundary_ratio, load_transformer, load_vae
    from wanlora.models.text import encoder_identity, load_text_embeds, pad_embeds
    from wanlora.models.variant import VARIANTS
    from wanlora.train.preview import preview_config

    variant, model, sample, build, _, on = case
    v = VARIANTS[variant]
    params = build(model, sample=sample)
    cfg = preview_config(params)
    samples = {s["id"]: s for s in read_jsonl(on / "data/buckets/samples.jsonl")}
    starts, ends = prompt_frames(cfg, read_split(on / SPLIT_FILE), samples, on, False)
    out = on / "data/train_live/previews/step_000006"
    for i, frame in enumerate(starts):
        assert np.array_equal(np.asarray(Image.open(out / f"start_{i:02d}.png")), frame)
    experts = [load_transformer(model, e, "fp32", "cpu") for e in v.experts]
    pipe = sampling.build_pipeline(experts[0], experts[1] if len(experts) > 1 else None, load_vae(model, "fp32", "cpu"),
                                   boundary_ratio(model) if v.boundary is not None else None,
                                   params.model.flow_shift, v)
    enc = encoder_identity(model)
    embed = lambda s: pad_embeds([load_text_embeds(on / "data/cache/text", s, enc)])  # noqa: E731
    files = {e: on / f"data/lora/{e}/step_000006.safetensors" for e in v.experts}
    with sampling.lora_applied(pipe, files, "check", v):
        videos = sampling.sample_videos(pipe, v, [embed(p) for p in PROMPTS], embed(""), cfg, starts, ends)
    assert len(videos) == _videos(variant)
    for i, video in enumerate(videos):
        first = np.asarray(Image.open(out / f"prompt_{i:02d}.png"))
        assert np.abs(first.astype(int) - to_uint8(video[0]).astype(int)).max() <= 1, i


def test_the_live_page_shows_the_start_images(case, tmp_path):
    variant, *_, on = case
    page = on / "data/train_live/index.html"
    html = page.read_text()
    assert [int(s) for s in re.findall(r'<tr data-step="(\d+)"', html)] == [6, 4, 2]
    assert html.count('<img class="start" src="previews/step_000006/start_') == len(PROMPTS)
    assert html.count("<video ") == 3 * _videos(variant)
    if variant == "ti2v-5b":
        assert html.count("(from its start image)</th>") == len(PROMPTS)  # evaluate's column labels
    if CHROMIUM.exists():
        shot = tmp_path / "shot.png"
        subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1000,900", page.as_uri()], check=True, timeout=120, capture_output=True)
        assert np.asarray(Image.open(shot).convert("L")).astype(float).std() > 10


def test_a_kill_during_an_image_preview_resumes_to_the_same_files(case, tmp_path, monkeypatch):
    """A kill inside the second preview's sampling leaves only the first preview complete; the
    resumed run renders the second again and ends with the same LoRAs and live files."""
    variant, model, sample, build, _, on = case
    base = tmp_path / "fresh"
    ws, *_ = _setup(variant, base)
    params = build(model, sample=sample)
    real, calls = sampling.generate, [0]
    per_preview = 2 if variant == "ti2v-5b" else 1

    def killed(pipe, *args):
        if calls[0] == per_preview:  # the second preview (step 4)
            raise KeyboardInterrupt("simulated kill")
        calls[0] += 1
        return real(pipe, *args)

    monkeypatch.setattr(sampling, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.run_stage(params, ws)
    monkeypatch.undo()
    state = next((ws / "scratch/train").iterdir())
    assert sorted(p.name for p in state.glob("previews/*/step_*") if (p / "result.json").is_file()) == ["step_000002"]
    loop.run_stage(params, ws)
    assert _loras(ws) == _loras(on)
    ref = on / "data/train_live"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and ("previews" in p.parts
                                                                                  or p.name == "index.html"))
    assert len(files) == 1 + 3 * (2 * _videos(variant) + len(PROMPTS) + 2)  # page; mp4s, pngs, starts, sheet, result
    for rel in files:
        assert (ws / "data/train_live" / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_a_missing_start_image_stops_before_training(tmp_path):
    from wanlora.errors import UserError

    ws, model, sample, build = _setup("ti2v-5b", tmp_path)
    params = build(model, sample={**sample, "images": ["missing.png", "start1.png"]})
    with pytest.raises(UserError, match="missing.png"):
        loop.run_stage(params, ws)
    assert not (ws / "data/lora").exists()  # no step was trained


def test_a_preview_lora_for_an_expert_ti2v_lacks_is_refused(tmp_path):
    ws, model, sample, build = _setup("ti2v-5b", tmp_path)
    (ws / "distill.safetensors").write_bytes(b"")
    params = build(model, sample={**sample, "preview_lora": {"low": "distill.safetensors"}})
    with pytest.raises(InputError, match=r"sample.preview_lora.low: .*no low-noise expert"):
        loop.run_stage(params, ws)
