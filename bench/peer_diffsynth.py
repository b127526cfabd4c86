"""A peer's step on the same GPU: DiffSynth-Studio's own Wan model code, trained as its LoRA script does.

DiffSynth-Studio (`diffsynth` on PyPI) ships its own Wan DiT (`diffsynth.models.wan_video_dit.WanModel`),
not diffusers'. Its LoRA training (`diffsynth/diffusion/training_module.py`, `add_lora_to_model`):
peft `inject_adapter_in_model` on `q,k,v,o,ffn.0,ffn.2` (its default `--lora_target_modules`), LoRA
weights cast to the pipeline dtype (bf16), `torch.optim.AdamW`, and per-block gradient checkpointing
(`use_gradient_checkpointing=True`, `core/gradient/gradient_checkpoint.py`); attention is
PyTorch's SDPA where flash-attn is not installed. Here: the Wan2.2-T2V-A14B config from its
`configs/model_configs.py` (40 blocks, dim 5120, FFN 13824, 40 heads), random bf16 weights, rank 16
/ alpha 16 (the same LoRA parameter count as ours: 10 linears a block), the same random latents and
text as `bench/train_step.py`, a flow-matching MSE step (the naive baseline's, `bench.baseline_naive.naive_step_fn`).

The wheel travels with the device call and is installed there at run time; only its model file and
the checkpoint helper are imported (package `__init__`s are skipped: they pull in modelscope and the
whole pipeline zoo, which the peer step does not use).

    python3 -m bench.peer_diffsynth --frames 33 --height 512 --width 512
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from bench.baseline_naive import naive_step_fn, setup
from bench.common import append_row, failed_row, make_row, random_batch, reset_peak, step_counts, time_steps

A14B = {"has_image_input": False, "patch_size": [1, 2, 2], "in_dim": 16, "dim": 5120, "ffn_dim": 13824,
        "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 40, "num_layers": 40, "eps": 1e-06}
TINY = {**A14B, "dim": 64, "ffn_dim": 128, "text_dim": 32, "num_heads": 2, "num_layers": 2, "freq_dim": 32}
TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]


def import_wan_model() -> type:
    """DiffSynth's WanModel class, without executing the package `__init__`s (see the docstring)."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("diffsynth is not installed: carry its wheel (bench/RESULTS.md says how)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, sub in (("diffsynth", ""), ("diffsynth.core", "core"), ("diffsynth.models", "models")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root / sub)]
            sys.modules[name] = pkg
    from diffsynth.models.wan_video_dit import WanModel

    return WanModel


def t2v_forward(dit: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The text-to-video path of DiffSynth's `pipelines/wan_video.py::model_fn_wan_video`, training mode.

    `WanModel.forward` of this release unpacks `patchify`'s result as a pair, which it is not
    (patchify returns the patch embedding alone), so DiffSynth's training calls
    `model_fn_wan_video` instead; importing that module pulls in every pipeline, so the same
    steps, on DiffSynth's own modules and checkpoint helper, are written out here.
    """
    from einops import rearrange

    from diffsynth.core.gradient import gradient_checkpoint_forward
    from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d

    t = dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, timestep))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))
    context = dit.text_embedding(context)
    x = dit.patchify(latents)
    f, h, w = x.shape[2:]
    x = rearrange(x, "b c f h w -> b (f h w) c").contiguous()
    freqs = torch.cat([
        dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1).to(x.device)
    for block in dit.blocks:
        x = gradient_checkpoint_forward(block, True, False, x, context, t_mod, freqs)
    x = dit.head(x, t)
    return dit.unpatchify(x, (f, h, w))


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    from peft import LoraConfig, inject_adapter_in_model

    wan_model = import_wan_model()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = wan_model(**(TINY if tiny else A14B))
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.to(dtype)  # add_lora_to_model(upcast_dtype=pipe.torch_dtype)
        p.requires_grad_(True)
    model.train()
    return model, params


def main() -> None:
    args, cfg, device, dtype, shape = setup(__doc__.splitlines()[0])
    name = "peer: DiffSynth-Studio WanModel + peft LoRA (1 expert, per-block ckpt)"
    try:
        model, params = build(args.tiny, device, dtype)
        n_lora = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4)
        batch = random_batch(cfg, shape, device, dtype)
        if args.tiny:
            batch["text"] = batch["text"][..., : TINY["text_dim"]]
        # its pipeline passes the timestep in the model dtype
        step = naive_step_fn(lambda noisy, t, text: t2v_forward(model, noisy, t.to(dtype), text), batch, opt)
        reset_peak(device)
        times = time_steps(step, *step_counts(args), device)
        row = make_row(name, cfg, shape, times, device, note=f"LoRA parameters {n_lora:,}; eager; torch AdamW; bf16 LoRA",
                       extra={"lora_params": n_lora})
    except torch.OutOfMemoryError as err:
        row = failed_row(name, cfg, shape, device, err)
    append_row(args.out, row)


if __name__ == "__main__":
    main()
