"""The start-image condition of Wan 2.2 I2V A14B: what the 20 channels beside the noisy latent hold.

The I2V experts take 36 channels: the noisy latent (16), a frame mask (4) and the VAE latent of a
"condition video" whose first frame is the start image and whose other frames are zeros (16), in
that order. This module builds them exactly as diffusers' `WanImageToVideoPipeline.prepare_latents`
does at inference (the tests compare the two on the tiny model), so a LoRA trains on the inputs it
will be sampled with:

- `condition_pixels`: the sample's own first frame (after trim, crop, resize and flip: the pixels
  the latent was encoded from), then zeros. Optionally the last frame too (`last=True`), the
  pipeline's `last_image`.
- the VAE's mode (`argmax`, the posterior mean), normalised like the latent: prepare_latents
  encodes with `sample_mode="argmax"`. AI Toolkit (`toolkit/models/wan21/wan_utils.py`,
  `add_first_frame_conditioning`) draws a sample instead; we keep inference's value, so the
  condition a LoRA trains on is the one it is sampled with.
- `frame_mask`: 1 on the conditioned pixel frames, 0 elsewhere, with the first frame repeated 4x
  so the 4n+1 pixel frames fill 4 channels of n+1 latent frames.

The loss covers every latent frame, the first included, as AI Toolkit's Wan 2.2 14B I2V trains
(`extensions_built_in/diffusion_models/wan22/wan22_14b_i2v_model.py`, `get_noise_prediction`: no
loss mask; its 5B model masks the first frame because there it is fed clean, at t = 0). In the
A14B the first latent frame is noised like the others and decoded from the denoised latent, so
the model must learn to reproduce it.
"""

from __future__ import annotations

import torch

from wanlora.models.variant import Variant, VariantError


def check_last_frame(last_frame: bool, variant: Variant) -> None:
    """`train.last_frame` only means something to a model that takes a condition video."""
    if last_frame and not variant.image_condition:
        raise VariantError(f"train.last_frame is set, but the model is {variant.describe()}, which takes no "
                           "condition frames. Fix: set train.last_frame: false, or use Wan 2.2 I2V A14B")


def condition_pixels(pixels: torch.Tensor, last: bool = False) -> torch.Tensor:
    """[C, F, H, W] pixels in [-1, 1] -> the condition video: frame 0 kept (and frame F-1 with
    `last`), every other frame 0 (mid-grey)."""
    out = torch.zeros_like(pixels)
    out[:, 0] = pixels[:, 0]
    if last:
        out[:, -1] = pixels[:, -1]
    return out


def frame_mask(latent_frames: int, height: int, width: int, temporal_factor: int = 4, last: bool = False,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The mask channels [temporal_factor, latent_frames, height, width] (latent height/width).

    Pixel frame 0 is repeated `temporal_factor` times so 4n+1 frames make 4(n+1) slots; slot s
    lands in channel s % 4 of latent frame s // 4. Conditioned frames are 1.
    """
    frames = (latent_frames - 1) * temporal_factor + 1
    per_frame = torch.zeros(frames, dtype=dtype)
    per_frame[0] = 1
    if last:
        per_frame[-1] = 1
    slots = torch.cat([per_frame[:1].repeat(temporal_factor), per_frame[1:]])
    mask = slots.view(latent_frames, temporal_factor).transpose(0, 1)
    return mask[:, :, None, None].expand(temporal_factor, latent_frames, height, width).contiguous()


def condition_input(latent: torch.Tensor, temporal_factor: int = 4, last: bool = False) -> torch.Tensor:
    """The condition channels of one sample: frame mask then the normalised condition latent
    [16, F', H, W] -> [4 + 16, F', H, W] (prepare_latents' second return value, per sample)."""
    _, f, h, w = latent.shape
    mask = frame_mask(f, h, w, temporal_factor, last, latent.dtype).to(latent.device)
    return torch.cat([mask, latent])


def model_input(noisy: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """What the transformer takes: the noisy latent [B, 16, ...], followed by the condition
    channels [B, 20, ...] for I2V (the pipeline's `torch.cat([latents, condition], dim=1)`)."""
    if condition is None:
        return noisy
    return torch.cat([noisy, condition.to(noisy.device, noisy.dtype)], dim=1)
