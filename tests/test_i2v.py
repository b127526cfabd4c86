"""Wan 2.2 I2V A14B on the tiny model: the condition channels, the training step and overfitting.

The reference is diffusers' `WanImageToVideoPipeline` (`prepare_latents` builds the 36-channel
input at inference: noisy latent 16 + frame mask 4 + VAE latent of [start image, zeros...] 16).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from _helpers import clip_frames, tiny_model, tiny_params, write_clip, write_inputs, write_latents
from wanlora.config import DEFAULT_TARGETS, NetworkConfig
from wanlora.data.dataset import build_dataset
from wanlora.io import write_jsonl
from wanlora.models import latents
from wanlora.models.condition import condition_input, frame_mask
from wanlora.models.loading import load_transformer, model_identity
from wanlora.models.variant import VARIANTS
from wanlora.train.lora import add_lora
from wanlora.train.step import StepBatch, training_step

I2V = VARIANTS["i2v-a14b"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("i2v") / "model", variant="i2v-a14b")


@pytest.fixture(scope="module")
def pipe(model):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(model)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, model) -> Path:
    """A workspace with one real 9-frame 32x48 clip window encoded by the latent_cache stage."""
    return _cached_workspace(tmp_path_factory.mktemp("ws"), model, last_frame=False)


@pytest.fixture(scope="module")
def cached_last(tmp_path_factory, model) -> Path:
    """The same, encoded with train.last_frame (the condition holds the window's last frame too)."""
    return _cached_workspace(tmp_path_factory.mktemp("ws_last"), model, last_frame=True)


def _cached_workspace(ws: Path, model: Path, last_frame: bool) -> Path:
    write_clip(ws / "data/raw/a.mp4", clip_frames(12, 48, 32))
    sample = {"id": "main/a.mp4#0", "clip_id": "main/a.mp4", "dataset": "main", "path": "data/raw/a.mp4",
              "sha256": "ab" * 32, "kind": "video", "width": 48, "height": 32, "num_frames": 9,
              "bucket": "48x32x9", "frame_indices": list(range(2, 11)), "crop": [0, 0, 48, 32], "flip": True}
    write_jsonl(ws / "data/buckets/samples.jsonl", [sample])
    write_jsonl(ws / "data/captions/captions.jsonl", [{"id": "main/a.mp4", "caption": "sks", "caption_dop": None}])
    from wanlora.data.split import run_stage as split_stage
    from wanlora.pipeline import CAPTION_MANIFEST, SAMPLES, SPLIT_FILE
    from wanlora.config import parse_params

    split_stage(parse_params({"sample": {"validation_clips": 0}}), ws / SAMPLES, ws / CAPTION_MANIFEST, ws / SPLIT_FILE)
    latents.run_stage(model, ws / "data/buckets/samples.jsonl", ws, ws / "data/cache/latents", "distribution",
                      "fp32", "cpu", {"main"}, {"main": "data/raw"}, variant=I2V, last_frame=last_frame)
    return ws


def _dataset(ws: Path, model: Path, last_frame: bool = False, variant=I2V):
    return build_dataset(ws, vae_config=json.loads((model / "vae/config.json").read_text()),
                         expect_vae=model_identity(model, "vae"), cached_datasets={"main"},
                         folders={"main": "data/raw"}, variant=variant, last_frame=last_frame)


@pytest.mark.parametrize("last", [False, True])
def test_frame_mask_is_prepare_latents_mask(pipe, last):
    """The 4 mask channels, first frame (and last, the pipeline's last_image) conditioned, against
    `WanImageToVideoPipeline.prepare_latents` for 17 frames (5 latent frames) at 32x48."""
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    extra = {"last_image": torch.rand(1, 3, 32, 48) * 2 - 1} if last else {}
    _, cond = pipe.prepare_latents(image, 1, 16, 32, 48, 17, torch.float32, "cpu",
                                   torch.Generator().manual_seed(0), **extra)
    ours = frame_mask(5, 4, 6, 4, last=last)
    assert cond.shape == (1, 20, 5, 4, 6)
    assert torch.equal(ours, cond[0, :4])
    assert ours[:, 0].eq(1).all() and ours[:, 1:4].eq(0).all()  # first latent frame: all four channels
    assert ours[:, 4].sum() == (4 * 6 if last else 0)  # last pixel frame: channel 3 of the last latent frame
    assert ours[3, 4].eq(1).all() if last else True


def test_cached_condition_is_prepare_latents_condition(pipe, cached, model):
    """What the trainer feeds beside the noisy latent (cache stage -> dataset) equals the condition
    `prepare_latents` builds from the sample's own first frame (after crop, resize and flip)."""
    data = _dataset(cached, model)
    latent, cond = data.inputs(0, torch.Generator().manual_seed(0))
    pixels = latents.load_frames(data.items[0].record, cached)  # the frames the latent came from
    _, ref = pipe.prepare_latents(pixels[None, :, 0], 1, 16, 32, 48, 9, torch.float32, "cpu",
                                  torch.Generator().manual_seed(0))
    assert cond.shape == (20, 3, 4, 6) and latent.shape == (16, 3, 4, 6)
    torch.testing.assert_close(cond, ref[0], rtol=0, atol=1e-6)
    # the start-image latent is the sample's own first frame: the first latent frame of the video
    # (the Wan VAE is causal) and nothing like the zeros after it
    assert not torch.allclose(cond[4:, 1], cond[4:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_prediction_is_the_pipelines(pipe, cached, model, dtype):
    """Our step's prediction (captured at the expert's output) equals the diffusers transformer's on
    the input the pipeline builds: scheduler-noised latent, then prepare_latents' condition, in the
    transformer dtype (bf16 on CPU: both sides round the same input once)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    data = _dataset(cached, model)
    g = torch.Generator().manual_seed(1)
    x0, cond = data.inputs(0, g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([700.0])
    emb = torch.randn(1, 7, 32, generator=g)
    expert = load_transformer(model, "high", dtype)
    add_lora(expert, NetworkConfig(rank=4, alpha=4))  # B starts at zero: the base's prediction, with a graph
    seen = []
    hook = expert.register_forward_hook(lambda m, i, o: seen.append(o[0].detach()))
    training_step(expert, StepBatch(x0[None], noise[None], t, emb, condition=cond[None]), dtype=dtype)
    hook.remove()

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    xt = sched.scale_noise(x0[None].to(dtype), t, noise[None].to(dtype))
    pixels = latents.load_frames(data.items[0].record, cached)
    _, ref_cond = pipe.prepare_latents(pixels[None, :, 0], 1, 16, 32, 48, 9, torch.float32, "cpu", None)
    with torch.no_grad():
        ref = expert(hidden_states=torch.cat([xt, ref_cond.to(dtype)], 1), timestep=t,
                     encoder_hidden_states=emb.to(dtype), return_dict=False)[0]
    assert seen[0].shape == (1, 16, 3, 4, 6)
    tol = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 2e-2}
    torch.testing.assert_close(seen[0].float(), ref.float(), **tol)


def test_last_frame_condition_is_prepare_latents_with_last_image(pipe, cached_last, model):
    """train.last_frame: the condition holds the window's first and last frame, as prepare_latents
    builds it from `image` and `last_image`; a cache made without it (or with it, for a run without)
    is refused, and the setting means nothing to T2V."""
    from wanlora.models.cachefiles import CacheError
    from wanlora.models.condition import check_last_frame
    from wanlora.models.variant import VariantError

    data = _dataset(cached_last, model, last_frame=True)
    _, cond = data.inputs(0, torch.Generator().manual_seed(0))
    pixels = latents.load_frames(data.items[0].record, cached_last)
    _, ref = pipe.prepare_latents(pixels[None, :, 0], 1, 16, 32, 48, 9, torch.float32, "cpu",
                                  torch.Generator().manual_seed(0), last_image=pixels[None, :, -1])
    torch.testing.assert_close(cond, ref[0], rtol=0, atol=1e-6)
    assert cond[3, -1].eq(1).all() and cond[:3, -1].eq(0).all()
    with pytest.raises(CacheError, match="made with the last frame, but train.last_frame is false"):
        _dataset(cached_last, model, last_frame=False)
    with pytest.raises(VariantError, match="train.last_frame is set, but the model is t2v-a14b"):
        check_last_frame(True, VARIANTS["t2v-a14b"])


def test_the_sampler_hands_start_and_end_frames_to_the_pipeline():
    """generate passes each prompt's start frame as `image` and, with train.last_frame, its end
    frame as `last_image` (uint8 pixels unchanged), at the prompt's seed."""
    import numpy as np

    from wanlora.config import SampleConfig
    from wanlora.evaluate import sampling

    seen = []

    class Pipe:
        _execution_device = "cpu"

        def __call__(self, **kw):
            seen.append(kw)
            return (np.zeros((1, 5, 32, 32, 3), np.float32),)

    cfg = SampleConfig(prompts=["a", "b"], num_frames=5, width=32, height=32)
    starts = [np.full((32, 32, 3), v, np.uint8) for v in (10, 20)]
    ends = [np.full((32, 32, 3), v, np.uint8) for v in (30, 40)]
    sampling.generate(Pipe(), [torch.zeros(1, 4, 32)] * 2, torch.zeros(1, 4, 32), cfg, starts, ends)
    assert [np.asarray(k["image"])[0, 0, 0] for k in seen] == [10, 20]
    assert [np.asarray(k["last_image"])[0, 0, 0] for k in seen] == [30, 40]
    sampling.generate(Pipe(), [torch.zeros(1, 4, 32)] * 2, torch.zeros(1, 4, 32), cfg, starts)
    assert "last_image" not in seen[-1]


def test_condition_channels_follow_the_latent_frames():
    cond = condition_input(torch.randn(16, 3, 2, 2))
    assert cond.shape == (20, 3, 2, 2) and torch.equal(cond[:4, 0], torch.ones(4, 2, 2))


def test_tiny_i2v_overfits_and_reads_the_start_image(tmp_path):
    """Two clips with one caption whose latents (one random vector per clip, constant over space
    and time) the start-image latent shows: in 400 steps the high-noise loss falls below 30% and
    the low-noise one below 60% (measured: 0.10 and 0.46; the low band holds t < 900, where the
    noise must be read out of a nearly clean latent), and after training the loss with the two
    start images swapped is over 4x the loss with the right ones (measured 7x): the LoRA learned
    to read the condition channels, not the caption (identical) or a memorised average."""
    from wanlora.models.text import run_stage as text_cache
    from wanlora.train import loop

    root = tiny_model(tmp_path / "model", "i2v-a14b", patch_size=[1, 1, 1])
    ws = tmp_path / "ws"
    write_inputs(ws)
    caps = [json.loads(line) for line in (ws / "data/captions/captions.jsonl").read_text().splitlines()]
    write_jsonl(ws / "data/captions/captions.jsonl", [{**c, "caption": "sks walking", "caption_dop": "person walking"}
                                                      for c in caps])
    text_cache(root=root, captions_manifest=ws / "data/captions/captions.jsonl", prompts=[], trigger="sks",
               dropout=("sks", "person"), out_dir=ws / "data/cache/text", dtype="fp32", quant="none", device="cpu")
    write_latents(ws, root, variant="i2v-a14b", scale=1.0, smooth=True)
    params = tiny_params(root, train={"steps": 400, "lr": 2e-2, "lr_scheduler": "cosine", "max_grad_norm": 0},
                         network={"rank": 16, "alpha": 16, "target_modules": [*DEFAULT_TARGETS, "proj_out"]},
                         save={"every": 1000}, multistage={"switch_every": 1})
    tr = loop.setup(params, ws)
    assert tr.variant.name == "i2v-a14b"
    loop.train(tr)
    for expert, ratio in (("high", 0.3), ("low", 0.6)):
        losses = [r[f"loss_{expert}"] for r in tr.history if f"loss_{expert}" in r]
        first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
        assert len(losses) == 200 and last < ratio * first, f"{expert}: {first:.3f} -> {last:.3f}"

    g = torch.Generator().manual_seed(5)
    (x_a, c_a), (x_b, c_b) = tr.data.inputs(0, g), tr.data.inputs(1, g)
    x0 = torch.stack([x_a, x_b])
    noise = torch.randn(x0.shape, generator=g)
    emb = loop.make_batch(tr, [0, 1], "high", torch.Generator().manual_seed(0)).embeds
    t = torch.tensor([950.0, 950.0])

    def loss(condition: torch.Tensor) -> float:
        expert = tr.experts["high"]
        expert.zero_grad(set_to_none=True)
        out = training_step(expert, StepBatch(x0, noise, t, emb, condition=condition), dtype=torch.float32)
        expert.zero_grad(set_to_none=True)
        return out.main

    right, swapped = loss(torch.stack([c_a, c_b])), loss(torch.stack([c_b, c_a]))
    assert swapped > 4 * right, f"right start images {right:.3f}, swapped {swapped:.3f}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model) -> Path:
    """A tiny I2V workspace trained 4 steps (both experts), exported in both formats, with a start image."""
    from PIL import Image

    from _helpers import make_workspace
    from wanlora.export.stage import run_stage as export_stage
    from wanlora.train import loop

    base = tmp_path_factory.mktemp("trained")
    ws = make_workspace(base / "ws", model, variant="i2v-a14b")
    Image.fromarray(clip_frames(1, 40, 30, seed=3)[0]).save(ws / "start.png")
    params = _eval_params(model)
    loop.run_stage(params, ws)
    export_stage(params, ws / "data/lora", ws / "data/eval/best.json", ws / "data/exports")
    return ws


def _eval_params(model: Path):
    return tiny_params(model, train={"steps": 4, "lr": 5e-2}, save={"every": 4},
                       sample={"prompts": ["sks person walking in the park 0"], "images": ["start.png"], "steps": 3, "num_frames": 5,
                               "width": 32, "height": 32, "guidance_scale": 2.0, "validation_clips": 0},
                       export={"step": "last"})


def test_exported_lora_in_wan_i2v_pipeline_reproduces_our_sampler(trained, model):
    """The diffusers files export writes, loaded by a fresh `WanImageToVideoPipeline` from the model
    folder (low-noise file into transformer_2), from the same start image, embeddings, scheduler and
    seed, make the video our evaluate sampler makes; and that video is not the baseline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from PIL import Image

    from wanlora.evaluate import sampling
    from wanlora.evaluate.stage import load_models, make_plan
    from wanlora.stages.evaluate import inputs

    params = _eval_params(model)
    plan = make_plan(params, trained, inputs(trained))
    assert plan.variant.name == "i2v-a14b" and plan.start_frames[0].shape == (32, 32, 3)
    loaded = load_models(params, trained, inputs(trained), plan)
    with sampling.lora_applied(loaded.pipe, plan.checkpoints[4], "step_4", plan.variant):
        ours = sampling.generate(loaded.pipe, loaded.prompt_embeds, loaded.negative_embeds, params.sample,
                                 plan.start_frames)[0]
    baseline = sampling.generate(loaded.pipe, loaded.prompt_embeds, loaded.negative_embeds, params.sample,
                                 plan.start_frames)[0]

    theirs_pipe = WanImageToVideoPipeline.from_pretrained(model)
    theirs_pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=params.model.flow_shift)
    files = {e: next((trained / "data/exports/diffusers").glob(f"*_{e}_noise.safetensors")) for e in ("high", "low")}
    theirs_pipe.load_lora_weights(str(files["high"]), adapter_name="a")
    theirs_pipe.load_lora_weights(str(files["low"]), adapter_name="a", load_into_transformer_2=True)
    out = theirs_pipe(image=Image.fromarray(plan.start_frames[0]), prompt_embeds=loaded.prompt_embeds[0],
                      negative_prompt_embeds=loaded.negative_embeds, height=32, width=32, num_frames=5,
                      num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(42),
                      output_type="np", return_dict=False)[0][0]
    assert ours.shape == (5, 32, 32, 3)
    assert abs(ours - baseline).max() > 1e-3  # the LoRA changes the video
    assert abs(ours - out).max() < 1e-4


def test_exported_files_are_i2v_loras_without_image_keys(trained):
    """ComfyUI native keys for the 2.2 I2V experts (no k_img/v_img: Wan 2.2 has no image
    cross-attention), and every file says which variant it fits."""
    from safetensors import safe_open

    comfy = sorted((trained / "data/exports/comfyui").glob("*.safetensors"))
    assert len(comfy) == 2
    for path in comfy + sorted((trained / "data/exports/diffusers").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert meta["wanlora.variant"] == "i2v-a14b"
        assert not [k for k in keys if "img" in k or "add_k_proj" in k or "add_v_proj" in k]
    with safe_open(str(comfy[0]), "pt") as f:
        assert all(k.startswith("diffusion_model.blocks.") for k in f.keys())


def test_a_t2v_lora_is_refused_by_the_i2v_sampler(trained, model, tmp_path):
    """A T2V A14B LoRA has the I2V experts' layer shapes and would load silently; its header's
    variant (or none: files before the switch are T2V) stops it, naming both models."""
    from safetensors.torch import load_file, save_file

    from wanlora.evaluate import sampling
    from wanlora.tensorfiles import read_header
    from wanlora.models.variant import VariantError

    src = next((trained / "data/lora/high").glob("*.safetensors"))
    _, meta = read_header(src)
    t2v = tmp_path / "t2v_high.safetensors"
    save_file(load_file(src), t2v, {k: v for k, v in meta.items() if k != "wanlora.variant"})

    class Pipe:  # refused before anything is loaded into it
        def load_lora_weights(self, *a, **k):
            raise AssertionError("loaded")

    with pytest.raises(VariantError) as err:
        with sampling.lora_applied(Pipe(), {"high": t2v}, "x", I2V):
            pass
    msg = str(err.value)
    assert "made for t2v-a14b" in msg and "the model is i2v-a14b" in msg and "36 input channels" in msg


@pytest.mark.slow
def test_the_i2v_demo_runs_the_whole_pipeline(tmp_path):
    """`wanlora demo --variant i2v-a14b` (4 steps): every stage runs on the tiny I2V model, the cache
    holds each sample's condition latent, the samples start from the held-out clip's first frame,
    and the exports fit i2v-a14b and pass the audit."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    from wanlora.data.split import SPLIT_FILE, read_split
    from wanlora.demo import make_demo
    from wanlora.evaluate.start_images import first_frame
    from wanlora.export.audit import verify
    from wanlora.io import read_jsonl

    ws = tmp_path / "demo"
    make_demo(ws, steps=4, variant="i2v-a14b")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    index = json.loads((ws / "data/cache/latents/index.json").read_text())
    assert index["variant"] == "i2v-a14b"
    with safe_open(str(ws / f"data/cache/latents/{next(iter(index['samples'].values()))}.safetensors"), "pt") as f:
        assert {"mean", "logvar", "condition"} <= set(f.keys())
    split = read_split(ws / SPLIT_FILE)
    samples = {s["id"]: s for s in read_jsonl(ws / "data/buckets/samples.jsonl")}
    start = first_frame(samples[split.validation_samples[0]], ws, 64, 64)
    result = json.loads((ws / "data/eval/samples/baseline/result.json").read_text())
    assert result["size"] == [64, 64] and start.shape == (64, 64, 3) and start.std() > 5  # a real picture
    exports = sorted((ws / "data/exports").glob("*/*.safetensors"))
    assert len(exports) == 4
    for path in exports:
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["wanlora.variant"] == "i2v-a14b"
    assert verify(exports[0], ws).all_unchanged
