"""The reference a user gets by wiring diffusers + peft by hand: what wanlora's step must beat.

One full-size Wan 2.2 A14B expert in bf16 (random weights), peft LoRA rank 16 / alpha 16 on
to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2, diffusers' `enable_gradient_checkpointing()`
(full recomputation), PyTorch's default SDPA choice, `torch.optim.AdamW`, a flow-matching MSE step
written inline. Nothing of wanlora's training code is used, on purpose.

    python bench/baseline_naive.py --frames 33 --height 512 --width 512 [--variant i2v-a14b] [--tiny] [--profile]

With `--variant i2v-a14b` the expert takes the 20 condition channels beside the noisy latent
(concatenated, as WanImageToVideoPipeline does); with `ti2v-5b` it is the 5B transformer, given
the step's timestep on every token (its `expand_timesteps` input, text-to-video).
"""

from __future__ import annotations

import torch
from peft import LoraConfig

from bench.common import (
    Shape, append_row, common_args, device_and_dtype, failed_row, geometry, make_row,
    random_batch, reset_peak, step_counts, time_steps, variant_of, write_profile,
)
from wanlora.models.geometry import build_transformer, tokens
from wanlora.models.variant import VARIANT_NAMES

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def naive_step_fn(predict, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer):
    """A hand-written flow-matching LoRA step: uniform t, x_t = (1-s) x0 + s eps, MSE on eps - x0.

    `predict(noisy, t, text)` is the model's velocity prediction (float t in [0, 1000)); the peer
    benchmark (bench/peer_diffsynth.py) uses the same step around DiffSynth-Studio's model.
    """
    latent, text = batch["latent"], batch["text"]

    def step(i: int) -> float:
        g = torch.Generator(device=latent.device).manual_seed(i)
        t = torch.rand(1, device=latent.device, generator=g) * 1000
        noise = torch.randn(latent.shape, device=latent.device, dtype=latent.dtype, generator=g)
        sigma = (t / 1000).to(latent.dtype).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * latent + sigma * noise
        loss = torch.nn.functional.mse_loss(predict(noisy, t, text).float(), (noise - latent).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def setup(description: str):
    """Parse the command line (common options and the clip's --frames/--height/--width):
    (args, geometry, device, dtype, shape); --tiny runs 5 frames at 32x32."""
    p = common_args(description)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--variant", default="t2v-a14b", choices=VARIANT_NAMES)
    args = p.parse_args()
    device, dtype = device_and_dtype(args.tiny)
    shape = Shape(args.frames, args.height, args.width) if not args.tiny else Shape(5, 32, 32)
    return args, geometry(args.tiny, args.variant), device, dtype, shape


def main() -> None:
    args, cfg, device, dtype, shape = setup(__doc__.splitlines()[0])
    v = variant_of(cfg)
    name = "naive diffusers+peft (1 expert, full ckpt)" + ("" if v.name == "t2v-a14b" else f", {v.label}")
    try:
        model = build_transformer(cfg, dtype, device)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
        model.enable_gradient_checkpointing()
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

        batch = random_batch(cfg, shape, device, dtype)
        cond = batch.get("condition")
        n = tokens(shape.frames, shape.height, shape.width, tuple(cfg["patch_size"]), v.spatial_factor)

        def predict(noisy, t, text):
            x = noisy if cond is None else torch.cat([noisy, cond], dim=1)
            t = t.expand(1, n) if v.expand_timesteps else t
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

        step = naive_step_fn(predict, batch, opt)
        reset_peak(device)
        times = time_steps(step, *step_counts(args), device)
        row = make_row(name, cfg, shape, times, device)
        if args.profile:
            write_profile(step, device, args.out / f"profile_naive_{shape.slug}.md")
    except torch.OutOfMemoryError as err:
        row = failed_row(name, cfg, shape, device, err)
    append_row(args.out, row)


if __name__ == "__main__":
    main()
