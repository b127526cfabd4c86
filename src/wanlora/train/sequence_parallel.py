"""Sequence parallelism (Ulysses): the tokens of one sample split over the N ranks of a group.

Why: one 81-frame 1024² clip is 86k tokens, and a Wan A14B step on it is one GPU's work however
many GPUs there are (data- and expert-parallel split *samples*). With `train.sequence_parallel: N`
each rank of a group of N holds 1/N of the sample's tokens through every block, so activations
per GPU fall by ~N and the step's FLOPs are shared.

How, per Wan expert (`enable_sequence_parallel`):
- the patch embedding's output is cut into N contiguous token ranges, one per rank, and so are
  the rotary tables (`rope`) and, for TI2V-5B's per-token timesteps, the timestep row: RoPE
  positions and modulation follow each shard;
- self-attention (`UlyssesSelfAttention`, each block's `attn1` processor) projects q, k, v for
  its own tokens, applies the shared-across-heads RMS norm and RoPE locally, then one all-to-all
  trades "my tokens, all heads" for "all tokens, my 1/N of the heads"; attention runs exactly
  over the whole sequence for those heads, and a second all-to-all trades back. N must divide the
  heads (40 for A14B: 2, 4, 5, 8; 24 for TI2V-5B) and every bucket's token count;
- cross-attention (512 text tokens, the same on every rank) and the FFN are per token: they stay
  local, with no communication;
- the output projection's shard is all-gathered, so the model returns the full prediction on
  every rank and `training_step` computes the loss, DOP and differential guidance unchanged.

Gradients: the gather's backward keeps only this rank's slice (every rank computed the same loss
from the same full output), and the split's backward is zero outside the slice, so each rank's
LoRA gradient is its share of the full gradient: the ranks' gradients *sum* to one process's.
`step.optimizer_step` averages over all DP x SP ranks with the loss scaled by the group
size, which is that sum for SP and the usual mean for DP (see `optimizer_step`).

Why our own processor and not diffusers' context parallelism (`enable_parallelism`,
`ContextParallelConfig(ulysses_degree=N)`, diffusers 0.42 `attention_dispatch.TemplatedUlyssesAttention`):
that path wraps attention in a custom autograd Function with backward ops of its own (the native
one runs the attention forward again) that hide the SDPA op from autograd, so our selective
checkpointing (which keeps self-attention outputs by recognising the SDPA op, `models.accel`)
could not keep them, and it takes a DeviceMesh of its own rather than our DP x SP groups. Here the
all-to-alls are torch's differentiable functional collectives (`all_to_all_single_autograd`,
traceable by torch.compile) and SDPA stays a plain op.

The other levers: checkpointing (full or selective) recomputes a block's all-to-alls with it, on
every rank in the same order; activation offloading and fp8 matmuls act on each rank's own
tensors; regional compile traces the exchange with no graph break. All are tested on CPU gloo
(tests/test_sequence_parallel.py), none yet on a GPU. Refused in params: `train.sharded_base`
(FSDP over SP ranks is untested) and `network.dropout` > 0 (masks would be drawn per shard).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from wanlora.train.distributed import DistEnv, DistributedError


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: `size` ranks (contiguous world ranks), its place
    `rank` in it, and the process group (None when size is 1)."""

    size: int = 1
    rank: int = 0
    group: Any = None

    @property
    def active(self) -> bool:
        return self.size > 1


# ------------------------------------------------------------------------------ validation
def valid_degrees(heads: int, token_counts: list[int]) -> list[int]:
    """Sequence-parallel sizes that split `heads` and every count in `token_counts` evenly."""
    return [n for n in range(2, heads + 1) if heads % n == 0 and all(t % n == 0 for t in token_counts)]


def bucket_tokens(bucket: str, vae_config: dict, patch: list[int] | tuple[int, ...]) -> int:
    """Transformer tokens of a bucket "WxHxF": latent frames and sides by the VAE's own factors
    (Wan 2.2 A14B: 4x time, 8x space; TI2V-5B's VAE: 16x space), then the patch."""
    w, h, f = (int(v) for v in bucket.split("x"))
    st, ss = vae_config.get("scale_factor_temporal") or 4, vae_config.get("scale_factor_spatial") or 8
    return ((f - 1) // st + 1) // patch[0] * (h // ss // patch[1]) * (w // ss // patch[2])


def check_degree(n: int, heads: int, tokens: dict[str, int]) -> None:
    """Refuse a `train.sequence_parallel` that leaves heads or tokens unevenly split, naming the
    sizes that work. `tokens` maps each bucket of the dataset to its token count."""
    if n == 1:
        return
    why = []
    if heads % n:
        why.append(f"the model's {heads} attention heads")
    uneven = {b: t for b, t in sorted(tokens.items()) if t % n}
    if uneven:
        shown = ", ".join(f"{b} ({t} tokens)" for b, t in list(uneven.items())[:4])
        why.append(f"the tokens of bucket(s) {shown}")
    if why:
        ok = valid_degrees(heads, list(tokens.values()))
        valid = ", ".join(map(str, ok)) if ok else "none above 1 (change the buckets' frames or sides)"
        raise DistributedError(
            f"train.sequence_parallel is {n}, which does not evenly split {' and '.join(why)}. "
            f"Values that split the {heads} heads and every bucket's tokens: {valid}. Fix: set "
            f"train.sequence_parallel to one of them, or change datasets.*.bucket (resolutions, num_frames)")


def check_model_degree(n: int, root: Path, experts: tuple[str, ...], buckets: list[str], vae_config: dict) -> None:
    """`check_degree` for the experts of the model folder `root` and the dataset's buckets, from
    the experts' config.json: before minutes of loading weights."""
    if n == 1:
        return
    from wanlora.models.loading import EXPERT_FOLDERS

    for e in experts:
        cfg = json.loads((root / EXPERT_FOLDERS[e] / "config.json").read_text(encoding="utf-8"))
        check_degree(n, cfg["num_attention_heads"],
                     {b: bucket_tokens(b, vae_config, cfg["patch_size"]) for b in set(buckets)})


def check_world(world: int, n: int) -> None:
    """World = (data- or expert-parallel replicas) x N: refuse a launch that does not divide."""
    if n > 1 and world % n:
        raise DistributedError(
            f"train.sequence_parallel is {n} but {world} process(es) were launched: the world must be a multiple "
            f"of it (world = data-parallel x sequence-parallel). Fix: launch {n * max(1, world // n)} or "
            f"{n * (world // n + 1)} processes, or set train.sequence_parallel to a divisor of {world}")


def make_sequence_group(env: DistEnv, n: int) -> SequenceGroup:
    """The group of N contiguous ranks this rank belongs to (ranks kN .. kN+N-1: on one node they
    share NVLink). `new_group` is collective: every rank creates every group, in order."""
    if n == 1:
        return SequenceGroup()
    check_world(env.world, n)
    mine = None
    for start in range(0, env.world, n):
        group = dist.new_group(list(range(start, start + n)))
        if start <= env.rank < start + n:
            mine = group
    return SequenceGroup(n, env.rank % n, mine)


# ------------------------------------------------------------------------- communication
def _exchange(x: torch.Tensor, sp: SequenceGroup, scatter: int, gather: int) -> torch.Tensor:
    """All-to-all over the group: split `x` into N parts along `scatter`, send part j to rank j,
    concatenate what arrives along `gather` (in rank order). Differentiable (its backward is the
    reverse exchange) and traceable by torch.compile."""
    parts = torch.stack(x.chunk(sp.size, dim=scatter)).contiguous()  # [N, ...]: part j goes to rank j
    got = funcol.all_to_all_single_autograd(parts, None, None, sp.group)
    if isinstance(got, funcol.AsyncCollectiveTensor):
        got = got.wait()
    return torch.cat(got.unbind(0), dim=gather)


def seq_to_heads(x: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    """[B, S/N, H, D] (my tokens, all heads) -> [B, S, H/N, D] (all tokens, my heads)."""
    return _exchange(x, sp, scatter=2, gather=1)


def heads_to_seq(x: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    """[B, S, H/N, D] -> [B, S/N, H, D], the inverse of `seq_to_heads`."""
    return _exchange(x, sp, scatter=1, gather=2)


class _Shard(torch.autograd.Function):
    """This rank's slice of a tensor every rank holds whole; the gradient is zero elsewhere (the
    other ranks' slices carry theirs), so the ranks' gradients sum to the full one."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, sp: SequenceGroup) -> torch.Tensor:
        ctx.dim, ctx.sp, ctx.shape = dim, sp, x.shape
        return x.chunk(sp.size, dim=dim)[sp.rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        full = grad.new_zeros(ctx.shape)
        full.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].copy_(grad)
        return full, None, None


class _Gather(torch.autograd.Function):
    """The shards of all ranks concatenated along `dim`. Backward keeps this rank's slice only:
    every rank computes the same loss from the same gathered tensor, so the upstream gradients are
    equal and summing them (an all-gather's usual backward) would count it N times."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, sp: SequenceGroup) -> torch.Tensor:
        ctx.dim, ctx.sp = dim, sp
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].contiguous(), None, None


# ---------------------------------------------------------------------------- attention
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on [B, S, H, D] (diffusers `WanAttnProcessor`'s formula: pairs
    (x[2i], x[2i+1]) rotated by the position's angle; cos/sin tables repeat each value twice)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class UlyssesSelfAttention:
    """A diffusers attention processor for a Wan block's self-attention (`attn1`) under sequence
    parallelism; the math is `WanAttnProcessor`'s (diffusers 0.42, transformer_wan.py) for a
    self-attention layer, with the two all-to-alls around the attention kernel."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, sp: SequenceGroup) -> None:
        self.sp = sp

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("UlyssesSelfAttention is for Wan's self-attention (attn1) only, without a mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS over all heads of a token: local
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:  # this shard's positions (the rope tables were sharded too)
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        query, key, value = (seq_to_heads(t, self.sp) for t in (query, key, value))
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        out = heads_to_seq(out, self.sp).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# ------------------------------------------------------------------------------- model
def enable_sequence_parallel(model: torch.nn.Module, sp: SequenceGroup) -> torch.nn.Module:
    """Make a Wan expert (`WanTransformer3DModel`, LoRA and `apply_accel` already applied) run
    sequence-parallel over `sp`; its state dict and outputs are unchanged, so LoRA files,
    checkpoints and every other rank count read the same tensors. Idempotent; a no-op for size 1."""
    if not sp.active or getattr(model, "_wanlora_sequence", None) is not None:
        return model
    heads = model.config.num_attention_heads
    if heads % sp.size:
        check_degree(sp.size, heads, {})
    for block in model.blocks:
        block.attn1.set_processor(UlyssesSelfAttention(sp))

    def shard_tokens(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        # patch embedding [B, D, F, H, W] -> this rank's token range as [B, D, S/N]; the model's own
        # flatten(2).transpose(1, 2) then gives [B, S/N, D] in the same (frame, row, column) order
        tokens = out.flatten(2)
        if tokens.shape[2] % sp.size:
            raise DistributedError(f"a sample of {tokens.shape[2]} tokens (latent {list(out.shape[2:])} after "
                                   f"patching) does not split over train.sequence_parallel={sp.size} ranks")
        return _Shard.apply(tokens, 2, sp)

    def shard_rope(_module: Any, _args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.chunk(sp.size, dim=1)[sp.rank] for t in out)  # [1, S, 1, D]: tables, no gradient

    def shard_timestep(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        t = kwargs.get("timestep")
        if t is not None and t.ndim == 2:  # TI2V-5B: one timestep per token
            kwargs = {**kwargs, "timestep": t.chunk(sp.size, dim=1)[sp.rank]}
        return args, kwargs

    def gather_tokens(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(out, 1, sp)  # [B, S/N, C*patch] -> [B, S, C*patch] before unpatchify

    model.patch_embedding.register_forward_hook(shard_tokens)
    model.rope.register_forward_hook(shard_rope)
    model.register_forward_pre_hook(shard_timestep, with_kwargs=True)
    model.proj_out.register_forward_hook(gather_tokens)
    model._wanlora_sequence = sp
    return model

