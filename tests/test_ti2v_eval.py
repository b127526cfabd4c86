"""Evaluate and export on the tiny TI2V 5B: the exported LoRA in diffusers' own pipelines makes our
sampler's videos (from text, and from a start image), and files of another variant are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import clip_frames, ti2v_params, ti2v_workspace
from safetensors import safe_open

from wanlora.models.variant import VariantError

PROMPT = "sks person walking in the park 0"


def _eval_params(model: Path, **sample):
    return ti2v_params(model, train={"steps": 4, "lr": 5e-2}, save={"every": 4}, export={"step": "last"},
                       sample={"prompts": [PROMPT], "steps": 3, "num_frames": 5, "width": 64, "height": 64,
                               "guidance_scale": 2.0, "validation_clips": 0, **sample})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny TI2V 5B workspace trained 4 steps, exported in both formats, with a start image."""
    from PIL import Image

    from wanlora.export.stage import run_stage as export_stage
    from wanlora.train import loop

    base = tmp_path_factory.mktemp("ti2v_eval")
    ws = ti2v_workspace(base / "ws", base / "model")
    Image.fromarray(clip_frames(1, 80, 64, seed=3)[0]).save(ws / "start.png")
    params = _eval_params(base / "model", images=["start.png"])
    loop.run_stage(params, ws)
    export_stage(params, ws / "data/lora", ws / "data/eval/best.json", ws / "data/exports")
    return ws, base / "model"


def test_exported_lora_in_diffusers_pipelines_reproduces_our_sampler(trained):
    """The diffusers file export writes, loaded by a fresh `WanPipeline.from_pretrained` of the
    model folder (expand_timesteps read from model_index.json) and by a `WanImageToVideoPipeline`
    of the same folder, with the same embeddings, start image, scheduler and seed, makes the
    videos our evaluate sampler makes; both differ from the baseline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    from wanlora.evaluate import sampling
    from wanlora.evaluate.stage import load_models, make_plan
    from wanlora.stages.evaluate import inputs

    ws, model = trained
    params = _eval_params(model, images=["start.png"])
    plan = make_plan(params, ws, inputs(ws))
    assert plan.variant.name == "ti2v-5b" and list(plan.checkpoints[4]) == ["main"]
    loaded = load_models(params, ws, inputs(ws), plan)
    image_pipe = sampling.image_pipeline(loaded.pipe)
    args = (loaded.prompt_embeds, loaded.negative_embeds, params.sample)
    with sampling.lora_applied(loaded.pipe, plan.checkpoints[4], "step_4", plan.variant):
        ours = sampling.generate(loaded.pipe, *args)[0]
        ours_i2v = sampling.generate(image_pipe, *args, plan.start_frames)[0]
    baseline, baseline_i2v = sampling.generate(loaded.pipe, *args)[0], sampling.generate(image_pipe, *args, plan.start_frames)[0]

    (file,) = (ws / "data/exports/diffusers").glob("*.safetensors")
    assert file.name == "wan22_lora_step000004.safetensors"  # one transformer: no _high_noise suffix
    run = dict(prompt_embeds=loaded.prompt_embeds[0], negative_prompt_embeds=loaded.negative_embeds, height=64,
               width=64, num_frames=5, num_inference_steps=3, guidance_scale=2.0, output_type="np", return_dict=False)
    outs = []
    for cls, extra in ((WanPipeline, {}), (WanImageToVideoPipeline, {"image": Image.fromarray(plan.start_frames[0])})):
        pipe = cls.from_pretrained(model)
        assert pipe.config.expand_timesteps and pipe.transformer_2 is None
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=params.model.flow_shift)
        pipe.load_lora_weights(str(file), adapter_name="a")
        outs.append(pipe(**extra, **run, generator=torch.Generator("cpu").manual_seed(42))[0][0])
    assert ours.shape == ours_i2v.shape == (5, 64, 64, 3)
    assert abs(ours - baseline).max() > 1e-3 and abs(ours_i2v - baseline_i2v).max() > 1e-3
    assert abs(ours - outs[0]).max() < 1e-4
    assert abs(ours_i2v - outs[1]).max() < 1e-4
    assert abs(ours_i2v - ours).max() > 1e-3  # the start image changes the video


def test_exported_files_name_the_variant_and_native_keys(trained):
    """ComfyUI native keys of the 5B geometry (3072-wide in the real model; the tiny's 32), one
    file per format, and every header says ti2v-5b and AI Toolkit's wan_2.2_5b."""
    ws, _ = trained
    comfy = sorted((ws / "data/exports/comfyui").glob("*.safetensors"))
    assert [p.name for p in comfy] == ["wan22_lora_step000004.safetensors"]
    with safe_open(str(comfy[0]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        q = f.get_tensor("diffusion_model.blocks.0.self_attn.q.lora_up.weight")
    assert all(k.startswith("diffusion_model.blocks.") for k in keys) and q.shape == (32, 4)
    assert meta["wanlora.variant"] == "ti2v-5b" and meta["ss_base_model_version"] == "wan_2.2_5b"


def test_a_t2v_lora_and_cache_are_refused_on_ti2v(trained, tmp_path_factory, tmp_path):
    """A T2V A14B LoRA (header variant t2v-a14b, or none: files before the switch) on the 5B
    sampler, and a T2V latent cache under a 5B trainer, stop naming both models and the fix."""
    import shutil

    from safetensors.torch import load_file, save_file

    from _helpers import make_workspace
    from wanlora.evaluate import sampling
    from wanlora.evaluate.stage import load_models, make_plan
    from wanlora.stages.evaluate import inputs
    from wanlora.io import atomic_write_json
    from wanlora.train import loop

    ws, model = trained
    t2v_ws = make_workspace(tmp_path_factory.mktemp("t2v") / "ws", tmp_path_factory.mktemp("t2v_model") / "model")
    params = _eval_params(model, images=["start.png"])
    plan = make_plan(params, ws, inputs(ws))
    loaded = load_models(params, ws, inputs(ws), plan)
    src = plan.checkpoints[4]["main"]
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    forged = tmp_path / "t2v.safetensors"
    save_file(load_file(src), forged, {**meta, "wanlora.variant": "t2v-a14b"})
    with pytest.raises(VariantError, match=r"made for t2v-a14b .*16 input channels.*but the model is ti2v-5b"
                                           r".*48 input channels.*one transformer.*Fix"):
        with sampling.lora_applied(loaded.pipe, {"main": forged}, "x", plan.variant):
            pass

    bad = shutil.copytree(ws, tmp_path / "ws")
    shutil.rmtree(bad / "data/cache/latents")
    shutil.copytree(t2v_ws / "data/cache/latents", bad / "data/cache/latents")
    with pytest.raises(Exception, match=r"latent cache made by VAE .*Fix: rebuild it"):  # another VAE altogether
        loop.setup(_eval_params(model), bad)
    shutil.rmtree(bad / "data/cache/latents")
    shutil.copytree(ws / "data/cache/latents", bad / "data/cache/latents")
    index = json.loads((bad / "data/cache/latents/index.json").read_text())
    del index["variant"]  # the same VAE, but a cache that says nothing of the variant was made for T2V
    atomic_write_json(bad / "data/cache/latents/index.json", index)
    with pytest.raises(VariantError, match=r"made for t2v-a14b.*but the model is ti2v-5b.*latent_cache"):
        loop.setup(_eval_params(model), bad)
