"""End-to-end check of cuDNN FP8 self-attention: training steps of the full-size expert, each run
twice on the same weights and batch (bf16 cuDNN attention, then FP8), compared.

Why: a kernel-level error (bench/fp8_attention.py) says how far one attention call is from float32;
what decides whether FP8 attention may train a LoRA is what reaches the loss and the LoRA's
gradients through 40 blocks. Each step: the high-noise expert of Wan 2.2 T2V A14B (random weights,
LoRA rank 16 as the product adds it, selective checkpointing, eager), one batch, the loss and LoRA
gradients with every block's self-attention on bf16 cuDNN, then on FP8 (`wanlora.models.fp8_attention`,
per-tensor power-of-two scales, delayed gradient scales); the relative loss difference and the cosine
similarity of the two gradients per group of ten blocks; then the optimizer steps on the bf16
gradients, so both runs see the weights a bf16 run would train. Inputs: random latents, and smooth
ones (low-resolution noise upsampled: neighbouring tokens alike, as in latents of real footage;
the random-weight VAE cannot give real latents).

    python3 -m bench.fp8_e2e [--steps 20] [--out DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_wan

from bench.common import Shape, geometry, random_batch
from wanlora.config import parse_params
from wanlora.models import fp8_attention as fa
from wanlora.models.accel import AccelSettings, apply_accel
from wanlora.models.geometry import build_transformer
from wanlora.train.lora import add_lora
from wanlora.train.optim import build_optimizer
from wanlora.train.step import StepBatch, training_step
from wanlora.train.timesteps import expert_band

GROUP = 10  # blocks per gradient group


class Fp8SelfAttention(transformer_wan.WanAttnProcessor):
    """diffusers' Wan processor with its one attention call sent to cuDNN FP8 (self-attention only:
    the blocks' attn1, which has no image keys), keeping this call site's amax state."""

    def __init__(self, state: torch.Tensor) -> None:
        super().__init__()
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        original = transformer_wan.dispatch_attention_fn
        transformer_wan.dispatch_attention_fn = lambda q, k, v, **_: fa.fp8_attention(q, k, v, self.state)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        finally:
            transformer_wan.dispatch_attention_fn = original


def smooth_latent(like: torch.Tensor, seed: int) -> torch.Tensor:
    """Unit-variance latent whose neighbouring tokens are alike: noise at 1/8 size, upsampled."""
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = like.shape
    low = torch.randn(b, c, max(1, f // 3), max(1, h // 8), max(1, w // 8), generator=g)
    up = F.interpolate(low, size=(f, h, w), mode="trilinear", align_corners=False)
    up = up + 0.1 * torch.randn(up.shape, generator=g)
    return (up / up.std()).to(like.device, like.dtype)


def lora_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The LoRA gradients in float32, taken off the parameters so the next run starts from none."""
    out = [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
           for p in params]
    for p in params:
        p.grad = None
    return out


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Cosine similarity of two gradient lists taken as one flat vector each (NaN if either is zero)."""
    dot = sum(float((x * y).sum()) for x, y in zip(a, b))
    na = sum(float(x.pow(2).sum()) for x in a) ** 0.5
    nb = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def run(kind: str, steps: int, tiny: bool, peak: float = 1.0, against: str = "fp8") -> list[dict]:
    """`steps` steps on `kind` inputs; `peak` scales every block's q and k norm weights by its
    square root (attention logits x peak: softmax concentrated as in trained models); `against`:
    fp8, or bf16 to measure the floor (the same bf16 step twice)."""
    cfg = geometry(tiny)
    device, dtype = torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    params = parse_params({"train": {"optimizer": "adamw"}})
    model = build_transformer(cfg, dtype, device)
    for b in model.blocks:
        for norm in (b.attn1.norm_q, b.attn1.norm_k):
            norm.weight.data *= peak**0.5
    lora = add_lora(model, params.network)
    apply_accel(model, AccelSettings(checkpointing="selective", compile=False))
    model.train()
    opt = build_optimizer(lora, params.train)
    ids = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    block_of = [int(ids[id(p)].split("blocks.")[1].split(".")[0]) for p in lora]
    bf16_procs = {i: b.attn1.processor for i, b in enumerate(model.blocks)}
    fp8_procs = {i: Fp8SelfAttention(fa.fresh_state(device)) for i in bf16_procs} if against == "fp8" else bf16_procs
    clean = random_batch(cfg, Shape(33, 512, 512) if not tiny else Shape(5, 32, 32), device, dtype)
    lo, hi = expert_band("high", 0.875)
    rows = []
    for step in range(steps):
        g = torch.Generator(device=device).manual_seed(step)
        latent = clean["latent"] if kind == "random" else smooth_latent(clean["latent"], step)
        batch = StepBatch(latents=latent, noise=torch.randn(latent.shape, device=device, dtype=dtype, generator=g),
                          timesteps=lo + (hi - lo) * torch.rand(1, device=device, generator=g), embeds=clean["text"])
        result = {}
        for mode, procs in (("bf16", bf16_procs), ("fp8", fp8_procs)):
            for i, b in enumerate(model.blocks):
                b.attn1.set_processor(procs[i])
            out = training_step(model, batch, dtype=dtype)
            result[mode] = (out.total, lora_grads(lora))
        (lb, gb), (lf, gf) = result["bf16"], result["fp8"]
        groups = {}
        for start in range(0, len(model.blocks), GROUP):
            pick = [k for k, blk in enumerate(block_of) if start <= blk < start + GROUP]
            groups[f"blocks {start}-{start + GROUP - 1}"] = cosine([gb[k] for k in pick], [gf[k] for k in pick])
        label = kind if peak == 1 and against == "fp8" else f"{kind}, logits x{peak:g}, {against}"
        row = {"input": label, "step": step, "loss_bf16": lb, "loss_fp8": lf, "rel_loss": abs(lf - lb) / abs(lb),
               "cos_all": cosine(gb, gf), "cos_groups": groups}
        print("CHECK " + json.dumps(row), flush=True)
        rows.append(row)
        for p, grad in zip(lora, gb):  # the bf16 run's update: both modes see its weights next
            p.grad = grad.to(p.dtype)
        torch.nn.utils.clip_grad_norm_(lora, params.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    del model, opt
    torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| input | steps | rel. loss difference median / max | gradient cosine median / min (all LoRA) | "
             "worst block group, min cosine |", "|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["input"] for r in rows):
        rs = [r for r in rows if r["input"] == kind and r["step"] > 0]  # step 0: B = 0, A's gradient is 0
        rel = [r["rel_loss"] for r in rs]
        cos = [r["cos_all"] for r in rs]
        worst = min(((g, c) for r in rs for g, c in r["cos_groups"].items()), key=lambda x: x[1])
        lines.append(f"| {kind} | {len(rs)} (of {len(rs) + 1}) | {100 * statistics.median(rel):.4f}% / "
                     f"{100 * max(rel):.4f}% | {statistics.median(cos):.6f} / {min(cos):.6f} | "
                     f"{worst[0]}: {worst[1]:.6f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inputs", nargs="+", default=["random", "smooth"])
    p.add_argument("--peak", type=float, default=1.0, help="attention logits x this (q, k norm weights x its root)")
    p.add_argument("--against", choices=["fp8", "bf16"], default="fp8", help="bf16: the floor, bf16 twice")
    p.add_argument("--tiny", action="store_true", help="two-layer model (still needs a Hopper GPU)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args()
    fa.check_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for kind in args.inputs:
        rows += run(kind, args.steps, args.tiny, args.peak, args.against)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fp8_e2e_{args.against}_x{args.peak:g}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(summary(rows))


if __name__ == "__main__":
    main()
