"""TI2V 5B: per-token timesteps and first-frame conditioning, pinned to diffusers and AI Toolkit.

References: diffusers `WanPipeline.__call__` with `expand_timesteps` (text-to-video: one timestep
per token, all equal) and `WanImageToVideoPipeline.prepare_latents` / `__call__` with
`expand_timesteps` (image-to-video: latent frame 0 replaced by the start image's latent, its
tokens at t = 0); AI Toolkit `extensions_built_in/diffusion_models/wan22/wan22_5b_model.py`,
`Wan225bModel.get_noise_prediction` (the same input built from the sample's own first frame in
training) and `Wan225bModel.scale_loss` (conditioned tokens leave the loss, renormalised).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import shared_tiny_model
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

from wanlora.models.geometry import TINY_TI2V_5B, latent_shape
from wanlora.models.latents import encode_frames, normalize_latents
from wanlora.models.loading import load_vae
from wanlora.train import flowmatch as fm
from wanlora.train import ti2v
from wanlora.train.step import StepBatch, training_step

SIGMA = 0.6  # the timestep both paths run at: 600


def _capture(model):
    """Record (hidden_states, timestep, output) of every forward of `model`."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone(),
                      out[0].detach().clone()))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


def _one_step_scheduler():
    """Flow-match Euler without shift whose one step is at sigma SIGMA (t = 600)."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    original = sched.set_timesteps
    sched.set_timesteps = lambda num_inference_steps=None, device=None, **kw: original(sigmas=[SIGMA], device=device)
    return sched


def _parts(root, dtype):
    vae = load_vae(root, torch.float32)
    model = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype).eval()
    return vae, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("i2v", [False, True])
def test_training_step_feeds_what_the_pipelines_feed(tmp_path_factory, dtype, i2v):
    """Our step's transformer input, per-token timesteps and prediction equal those of diffusers'
    own TI2V pipelines on the same clip, noise and timestep: WanPipeline(expand_timesteps) for
    text-to-video, WanImageToVideoPipeline(expand_timesteps) with the clip's first frame as the
    start image for image-to-video. float32 exactly; bf16 (rounded in a different order: the
    pipeline mixes in float32, the step in the compute dtype) to bf16 precision."""
    root = shared_tiny_model(tmp_path_factory, variant="ti2v-5b")
    vae, model = _parts(root, dtype)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 9, 64, 96, generator=g) * 2 - 1  # 9 frames -> 3 latent frames of 4x6
    mean, _ = encode_frames(vae, pixels)
    x0 = normalize_latents(mean, vae.config)[None]
    assert x0.shape[1:] == latent_shape(9, 64, 96, channels=48, spatial=16)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([SIGMA * 1000])
    emb = torch.randn(1, 512, TINY_TI2V_5B["text_dim"], generator=g)

    calls, handle = _capture(model)
    training_step(model, StepBatch(x0, noise, t, emb, clean_first=torch.tensor([i2v])), dtype=dtype)
    ours = calls.pop()
    pipe_kw = dict(prompt_embeds=emb, negative_prompt_embeds=emb, height=64, width=96, num_frames=9,
                   num_inference_steps=1, guidance_scale=1.0, latents=fm.add_noise(x0, noise, t), output_type="latent")
    parts = dict(tokenizer=None, text_encoder=None, transformer=model, vae=vae, scheduler=_one_step_scheduler(),
                 expand_timesteps=True)
    if i2v:
        image = (pixels[:, 0][None] + 1) / 2  # the start image in [0, 1], as the pipeline preprocesses it
        WanImageToVideoPipeline(image_encoder=None, image_processor=None, **parts)(image=image, **pipe_kw)
    else:
        WanPipeline(**parts)(**pipe_kw)
    handle.remove()
    (theirs,) = calls

    tokens = 3 * 2 * 3
    assert ours[1].shape == theirs[1].shape == (1, tokens)
    expect_t = torch.full((1, tokens), 600.0)
    if i2v:
        expect_t[0, :6] = 0.0  # the 2x3 patches of latent frame 0
    assert torch.equal(theirs[1].float(), expect_t) and torch.equal(ours[1].float(), expect_t)
    if dtype == torch.float32:  # noised frames bit for bit; the condition frame to float32 rounding
        assert torch.equal(ours[0][:, :, 1:], theirs[0][:, :, 1:])
        assert torch.allclose(ours[0], theirs[0], atol=1e-6, rtol=0)  # (z - m) / s against (z - m) * (1 / s)
        assert torch.allclose(ours[2], theirs[2], atol=1e-5, rtol=0)
    else:
        assert torch.allclose(ours[0].float(), theirs[0].float(), atol=0.02, rtol=0.02)
        assert torch.allclose(ours[2].float(), theirs[2].float(), atol=0.05, rtol=0.05)
    frame0 = ours[0][:, :, 0].float()
    if i2v:  # the clean start frame, not the noisy one
        assert torch.allclose(frame0, x0[:, :, 0], atol=0.02)
    else:
        assert not torch.allclose(frame0, x0[:, :, 0], atol=0.1)


def test_conditioned_frame_leaves_the_loss():
    """AI Toolkit's scale_loss: loss * mask / mask.mean() over a batch whose samples are all
    conditioned equals our per-sample masked mean; an error on frame 0 costs nothing there."""
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    mask = ti2v.frame_mask(pred.shape, torch.tensor([True, True]))
    aitk = ((pred - target) ** 2 * mask / mask.mean()).mean()
    assert torch.allclose(ti2v.masked_per_sample_mse(pred, target, mask).mean(), aitk)
    moved = pred.clone()
    moved[:, :, 0] += 5
    assert torch.equal(ti2v.masked_per_sample_mse(moved, target, mask), ti2v.masked_per_sample_mse(pred, target, mask))
    plain = ti2v.frame_mask(pred.shape, torch.tensor([False, True]))  # a T2V sample keeps every frame
    assert torch.allclose(ti2v.masked_per_sample_mse(pred, target, plain)[0], fm.per_sample_mse(pred, target)[0])
