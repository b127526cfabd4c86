"""TI2V 5B's model input: one timestep per token, and the first latent frame kept clean for I2V.

Wan 2.2 TI2V 5B is one transformer for text-to-video and image-to-video. It takes a timestep per
patch token (`timestep` of shape [B, tokens]; diffusers' `expand_timesteps`), so a token can be
noised or clean within one clip. Image-to-video is then the same model with the first latent
frame replaced by the start image's clean latent and its tokens at t = 0, exactly what diffusers'
`WanImageToVideoPipeline` builds when `expand_timesteps` is set (`prepare_latents` returns
`first_frame_mask`, zero on latent frame 0; the input is `(1 - mask) * condition + mask * latents`
and the timestep `mask[0][0][:, ::2, ::2] * t`, flattened); text-to-video is the mask of ones
(`WanPipeline` with `expand_timesteps`).

Training follows AI Toolkit's `wan22_5b` (extensions_built_in/diffusion_models/wan22/
wan22_5b_model.py, `Wan225bModel.get_noise_prediction` with `do_i2v`, and `scale_loss`): the
sample's own first latent frame is the condition (the Wan VAE is causal, so latent frame 0 of the
clip is the encoding of its first picture alone: the start image, as AI Toolkit encodes it), the
conditioned tokens get t = 0, and the loss leaves them out, renormalised by the share of tokens
that train. AI Toolkit renormalises by the mask mean of the whole batch; we do it per sample,
which is the same when every sample of the batch is conditioned (AI Toolkit's `do_i2v` is per
dataset) and keeps a T2V sample beside an I2V one at its own weight when they are mixed.
"""

from __future__ import annotations

import torch

from wanlora.config import DatasetConfig, MultistageConfig, Params, ParamsError
from wanlora.models.variant import Variant


def frame_mask(shape: torch.Size | tuple[int, ...], clean_first: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] float mask of the latent `shape` ([B, C, F, H, W]): 0 on latent frame 0 of
    the samples in `clean_first` ([B] bool: conditioned on their first frame), 1 elsewhere."""
    b, _, f, h, w = shape
    mask = torch.ones(b, 1, f, h, w, device=clean_first.device)
    mask[clean_first.bool(), :, 0] = 0.0
    return mask


def token_timesteps(t: torch.Tensor, mask: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, tokens] timesteps: each sample's t on every patch token, 0 where `mask` is 0.

    Tokens are in the transformer's order (frame, row, column of patches), one value per patch
    read at its first latent pixel, as the pipelines take `mask[:, :, ::p_t, ::p_h, ::p_w]`.
    """
    pt, ph, pw = patch
    per_token = mask[:, 0, ::pt, ::ph, ::pw].flatten(1)
    return per_token.to(torch.float32) * t.to(torch.float32).view(-1, 1)


def condition(noisy: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The transformer's input: the noisy latent where `mask` is 1, the clean latent where it is 0."""
    m = mask.to(noisy.dtype)
    return (1 - m) * clean + m * noisy


def masked_per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the elements `mask` keeps (the conditioned frame trains nothing), in
    float32; a sample's mean is over its own trained elements, so its loss has the scale of an
    unmasked one."""
    err = (pred.float() - target.float()).pow(2) * mask.float()
    kept = mask.float().expand_as(err).flatten(1).sum(1).clamp_min(1.0)
    return err.flatten(1).sum(1) / kept


#: Share of video samples trained image-to-video when `datasets.<name>.i2v_share` is null.
DEFAULT_I2V_SHARE = 0.5


def check_params(params: Params, variant: Variant) -> None:
    """Refuse settings that mean nothing for `variant`, naming each and the fix: on TI2V 5B
    (one transformer) every `multistage` setting (there is no second expert, no boundary, no
    switching); on the two-expert models `datasets.<name>.i2v_share` (only TI2V 5B takes a
    timestep per token and so a clean start frame)."""
    if len(variant.experts) == 1:
        default = MultistageConfig().model_dump()
        changed = [f"multistage.{k}: {v}" for k, v in params.multistage.model_dump().items() if v != default[k]]
        if changed:
            raise ParamsError(
                f"{', '.join(changed)}: {variant.label} is one transformer with no expert boundary, so there is "
                "nothing to switch between or leave out. Fix: delete these keys from params.yaml (or set them to "
                f"their defaults: {', '.join(f'{k}: {default[k]}' for k in default)})")
    else:
        set_share = [f"datasets.{n}.i2v_share: {d.i2v_share}" for n, d in params.datasets.items() if d.i2v_share is not None]
        if set_share:
            raise ParamsError(
                f"{', '.join(set_share)}: only TI2V 5B trains image-to-video by a clean first frame; {variant.label} "
                "does not. Fix: set it to null (or train Wan-AI/Wan2.2-TI2V-5B-Diffusers)")


def i2v_share(dataset: DatasetConfig) -> float:
    """The probability a video sample of `dataset` trains image-to-video."""
    return DEFAULT_I2V_SHARE if dataset.i2v_share is None else dataset.i2v_share
