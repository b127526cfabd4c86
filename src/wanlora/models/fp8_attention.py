"""FP8 self-attention, forward and backward, on cuDNN's fused kernels (`sdpa_fp8`, `sdpa_fp8_backward`).

Why: at 81f@832x480 cuDNN's bf16 flash attention is 6.0 s of a 9.0 s float8 step (bench/RESULTS.md,
H200 section), so no change to the linears reaches 8 s. Hopper's tensor cores run e4m3 at twice
the bf16 rate, and cuDNN's FP8 attention has a backward; PyTorch's SDPA does not expose it, and
NVIDIA's `nvidia-cudnn-frontend` package (1.16, no other dependencies) reaches it from Python.

Status: measured on an H200 (bench/RESULTS.md), **not wired into params**. The kernels are 1.22x
faster at 32,760 tokens (forward + backward 117 ms against 142 ms a layer; no gain at 9,216), but
with per-tensor scales their error is 25-120x bf16's: O 6%, dQ/dK/dV 7% on random inputs and
18-40% on peaked ones, against 0.15-0.56% for bf16 cuDNN, both against float32. A mode that does not
agree does not become a `model.attention_backend`; this module and `bench/fp8_attention.py` are
where the next attempt (per-head or per-block scales, e5m2 gradients) starts.
End to end (`bench/fp8_e2e.py`, 20 steps of the full-size expert on random weights) the LoRA
gradient keeps a cosine of 0.9999 with bf16, but 0.98 once attention logits are x16, as trained
attention is peaked; the real experts would have to pass that script before a preset uses it.

What cuDNN on Hopper (cuDNN 9.19, frontend 1.16) allows and what is done here:
- Q, K, V, O, dO, dQ, dK, dV are all e4m3: bf16/fp16 outputs are Blackwell-only ("sdpa fp8 forward
  with HALF/BFLOAT16 output is only supported on Blackwell", the frontend's check).
- Inputs get per-tensor power-of-two scales from their amax (`quantize`), computed on the device:
  a power of two makes scale and descale exact, so quantize and dequantize cancel.
- P (softmax probabilities, <= 1) has a fixed scale (`P_SCALE`; 256 and 448 measured the same).
- O's scale needs no history: each row of O is a convex combination of V's rows, so
  amax(O) <= amax(V).
- dQ, dK, dV and dS (cuDNN's "dP") must be scaled before the kernel computes them: delayed scaling
  from the amaxes the previous backward of the same call site reported (`grad_scales`, 2x headroom).
  A site's first backward refines them in two extra passes (`backward_with_state`): with unit
  scales dS underflows in e4m3, which flushes dQ and dK and makes their reported amax useless.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from wanlora.errors import UserError

E4M3_MAX = 448.0
P_SCALE = 256.0  # softmax probabilities are <= 1; 256 leaves e4m3 headroom below 448
MIN_CAPABILITY = (9, 0)
BACKEND_NAME = "cudnn_fp8"

_graphs: dict[tuple, Any] = {}
_lock = threading.Lock()
_tls = threading.local()


def check_available(device: torch.device) -> None:
    """Refuse, naming the fix, where cuDNN FP8 attention cannot run: CPU, pre-Hopper GPU, no package."""
    fix = "set model.attention_backend: auto (bf16 cuDNN attention)"
    if device.type != "cuda":
        raise UserError(f"model.attention_backend: {BACKEND_NAME} runs on an NVIDIA GPU only (device is {device}); {fix}")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise UserError(
            f"model.attention_backend: {BACKEND_NAME} needs compute capability >= 9.0 (Hopper); "
            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}; {fix}"
        )
    try:
        import cudnn  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"model.attention_backend: {BACKEND_NAME} needs NVIDIA's cuDNN frontend: "
            f"`pip install nvidia-cudnn-frontend` ({err}); or {fix}"
        ) from err


def pow2_scale(amax: torch.Tensor, limit: float = E4M3_MAX) -> torch.Tensor:
    """The largest power of two s with amax * s <= limit (float32, on amax's device; 1 for amax 0)."""
    amax = amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.floor(torch.log2(limit / amax))).clamp(max=2.0**60)


def quantize(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 codes of `x` and the descale (1 / scale) that turns them back, shape [1,1,1,1]."""
    if scale is None:
        scale = pow2_scale(x.abs().amax())
    codes = (x * scale.to(x.dtype)).to(torch.float8_e4m3fn)
    return codes, (1.0 / scale).reshape(1, 1, 1, 1)


def _handle(device: torch.device):
    import cudnn

    handles = getattr(_tls, "handles", None)
    if handles is None:
        handles = _tls.handles = {}
    if device not in handles:
        with torch.cuda.device(device):
            handles[device] = cudnn.create_handle()
    cudnn.set_stream(handle=handles[device], stream=torch.cuda.current_stream(device).cuda_stream)
    return handles[device]


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """Dims and strides of a [B, S, H, D] tensor described as cuDNN's [B, H, S, D]."""
    b, s, h, d = t.shape
    sb, ss, sh, sd = t.stride()
    return [b, h, s, d], [sb, sh, ss, sd]


def _scalar(g, name: str):
    import cudnn

    return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)


def _finish(g) -> Any:
    import cudnn

    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _build_forward(handle, q: torch.Tensor, k: torch.Tensor, attn_scale: float):
    import cudnn

    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(handle=handle, io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32)
    qd, qs = _bhsd(q)
    kd, ks = _bhsd(k)
    t = {"q": g.tensor(name="q", dim=qd, stride=qs, data_type=e4m3),
         "k": g.tensor(name="k", dim=kd, stride=ks, data_type=e4m3),
         "v": g.tensor(name="v", dim=kd, stride=ks, data_type=e4m3)}
    for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[n] = _scalar(g, n)
    args = {n: t[n] for n in ("q", "k", "v", "descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
    try:
        o, stats, amax_s, amax_o = g.sdpa_fp8(**args, generate_stats=True, attn_scale=attn_scale, use_causal_mask=False)
    except TypeError:  # frontends before `generate_stats` spell it as its negation
        o, stats, amax_s, amax_o = g.sdpa_fp8(**args, is_inference=False, attn_scale=attn_scale, use_causal_mask=False)
    o.set_output(True).set_dim(qd).set_stride(qs).set_data_type(e4m3)
    b, h, s, _ = qd
    stats.set_output(True).set_dim([b, h, s, 1]).set_stride([h * s, s, 1, 1]).set_data_type(f32)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    t.update(o=o, stats=stats, amax_s=amax_s, amax_o=amax_o)
    return _finish(g), t


def _build_backward(handle, q: torch.Tensor, k: torch.Tensor, attn_scale: float):
    import cudnn

    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(handle=handle, io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32)
    qd, qs = _bhsd(q)
    kd, ks = _bhsd(k)
    b, h, s, _ = qd
    t = {"q": g.tensor(name="q", dim=qd, stride=qs, data_type=e4m3),
         "k": g.tensor(name="k", dim=kd, stride=ks, data_type=e4m3),
         "v": g.tensor(name="v", dim=kd, stride=ks, data_type=e4m3),
         "o": g.tensor(name="o", dim=qd, stride=qs, data_type=e4m3),
         "dO": g.tensor(name="dO", dim=qd, stride=qs, data_type=e4m3),
         "stats": g.tensor(name="stats", dim=[b, h, s, 1], stride=[h * s, s, 1, 1], data_type=f32)}
    names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
             "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
    for n in names:
        t[n] = _scalar(g, n)
    outs = g.sdpa_fp8_backward(**{n: t[n] for n in ("q", "k", "v", "o", "dO", "stats") + names},
                               attn_scale=attn_scale, use_causal_mask=False)
    for n, out, (dims, strides) in zip(("dQ", "dK", "dV"), outs[:3], ((qd, qs), (kd, ks), (kd, ks))):
        out.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        t[n] = out
    for n, a in zip(("amax_dQ", "amax_dK", "amax_dV", "amax_dP"), outs[3:]):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        t[n] = a
    return _finish(g), t


def _graph(kind: str, q: torch.Tensor, k: torch.Tensor, attn_scale: float):
    """The built graph for these shapes and strides (built once, then cached)."""
    key = (kind, tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), attn_scale, q.device)
    handle = _handle(q.device)
    hit = _graphs.get(key)
    if hit is None:
        with _lock:
            hit = _graphs.get(key)
            if hit is None:
                build = _build_forward if kind == "fwd" else _build_backward
                hit = _graphs[key] = build(handle, q, k, attn_scale)
    return hit, handle


def _run(kind: str, q: torch.Tensor, k: torch.Tensor, attn_scale: float, data: dict[str, torch.Tensor]) -> None:
    (g, t), handle = _graph(kind, q, k, attn_scale)
    workspace = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device=q.device)
    g.execute({t[n]: v for n, v in data.items()}, workspace, handle=handle)


def _one(device: torch.device, value: float = 1.0) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_scale: float, p_scale: float = P_SCALE):
    """FP8 attention of bf16 [B, S, H, D] q, k, v.

    Returns (o8, descale_o, stats, amax(P)): e4m3 codes of O ([B, S, H, D]) and their descale (on
    Hopper cuDNN writes an FP8 O only), the softmax log-sum-exp [B, H, S, 1] for the backward.
    O's scale needs no history: every row of O is a convex combination of V's rows, so
    amax(O) <= amax(V).
    """
    q8, dq_ = quantize(q)
    k8, dk_ = quantize(k)
    v8, dv_ = quantize(v)
    s_o = pow2_scale(v.abs().amax()).reshape(1, 1, 1, 1)
    o8 = torch.empty_like(q, dtype=torch.float8_e4m3fn)
    b, s, h, _ = q.shape
    stats = torch.empty(b, h, s, 1, dtype=torch.float32, device=q.device)
    amax_s, amax_o = _one(q.device, 0.0), _one(q.device, 0.0)
    _run("fwd", q, k, attn_scale, {
        "q": q8, "k": k8, "v": v8, "descale_q": dq_, "descale_k": dk_, "descale_v": dv_,
        "descale_s": _one(q.device, 1.0 / p_scale), "scale_s": _one(q.device, p_scale), "scale_o": s_o,
        "o": o8, "stats": stats, "amax_s": amax_s, "amax_o": amax_o,
    })
    return o8, 1.0 / s_o, stats, amax_s


def dequantize(codes: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (codes.to(torch.float32) * descale.reshape(())).to(dtype)


def grad_scales(amax: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """Scales for dQ, dK, dV, dS from their amax seen in an earlier backward ([4] fp32), with headroom.

    cuDNN on Hopper writes the FP8 backward's gradients in e4m3 only, so their scales must be known
    before the kernel runs: delayed scaling, as Transformer Engine does, from the previous step's
    amax of the same call site, times `margin` for growth.
    """
    return pow2_scale(amax * margin)


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o8: torch.Tensor,
             descale_o: torch.Tensor, stats: torch.Tensor, attn_scale: float, scales: torch.Tensor,
             p_scale: float = P_SCALE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (bf16, [B, S, H, D]) of FP8 attention, and the amax of dQ, dK, dV, dS ([4] fp32).

    `scales` ([4] fp32) are the e4m3 scales of dQ, dK, dV, dS (`grad_scales`).
    """
    q8, dq_ = quantize(q)
    k8, dk_ = quantize(k)
    v8, dv_ = quantize(v)
    do8, ddo_ = quantize(do)
    sc = scales.float().reshape(4, 1, 1, 1, 1)
    dq8 = torch.empty_like(q, dtype=torch.float8_e4m3fn)
    dk8 = torch.empty_like(k, dtype=torch.float8_e4m3fn)
    dv8 = torch.empty_like(v, dtype=torch.float8_e4m3fn)
    amax = torch.zeros(4, 1, 1, 1, 1, dtype=torch.float32, device=q.device)
    _run("bwd", q, k, attn_scale, {
        "q": q8, "k": k8, "v": v8, "o": o8, "dO": do8, "stats": stats,
        "descale_q": dq_, "descale_k": dk_, "descale_v": dv_, "descale_o": descale_o, "descale_dO": ddo_,
        "descale_s": _one(q.device, 1.0 / p_scale), "descale_dP": 1.0 / sc[3],
        "scale_s": _one(q.device, p_scale), "scale_dQ": sc[0], "scale_dK": sc[1], "scale_dV": sc[2], "scale_dP": sc[3],
        "dQ": dq8, "dK": dk8, "dV": dv8,
        "amax_dQ": amax[0], "amax_dK": amax[1], "amax_dV": amax[2], "amax_dP": amax[3],
    })
    grads = tuple(dequantize(c, 1.0 / sc[i], q.dtype) for i, c in enumerate((dq8, dk8, dv8)))
    return (*grads, amax.reshape(4))


# ------------------------------------------------------------------ the autograd-aware op
# The amax state of a call site ([4] fp32: dQ, dK, dV, dS) is updated inside the backward op. The
# op is opaque to torch.compile and always runs, so the update happens; it is not declared as a
# mutation because a backward formula that mutates a forward input is not something AOTAutograd
# traces. Which sites have history is kept host-side by storage address, so no step waits on the
# GPU to find out (a state tensor must therefore live as long as its call site).
_seen: set[int] = set()


def fresh_state(device: torch.device) -> torch.Tensor:
    """A call site's amax state, before its first backward."""
    return torch.zeros(4, dtype=torch.float32, device=device)


def backward_with_state(do, q, k, v, o8, descale_o, stats, attn_scale, state):
    """`backward` with delayed scaling from `state`, which it updates (see the comment above).

    A site's first backward has no history, so it runs the kernel three times. With unit scales
    the amax of dS is right (cuDNN takes it before quantizing) but dS itself underflows, so dQ and
    dK come out flushed; the second pass scales dS from that amax and reads the amaxes of dQ, dK,
    dV; the third uses them. This is the sequence the H200 sweep measured (bench/RESULTS.md).
    """
    if state.data_ptr() not in _seen:
        ones = torch.ones(4, dtype=torch.float32, device=q.device)
        *_, first = backward(do, q, k, v, o8, descale_o, stats, attn_scale, ones)
        *_, second = backward(do, q, k, v, o8, descale_o, stats, attn_scale, grad_scales(first))
        state.copy_(torch.cat([second[:3], first[3:]]))
        _seen.add(state.data_ptr())
    dq, dk, dv, amax = backward(do, q, k, v, o8, descale_o, stats, attn_scale, grad_scales(state))
    state.copy_(amax)
    return dq, dk, dv


@torch.library.custom_op("wanlora::fp8_sdpa", mutates_args=())
def fp8_sdpa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, attn_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o8, descale_o, stats, _ = forward(q, k, v, attn_scale)
    return dequantize(o8, descale_o, q.dtype), o8, descale_o, stats


@fp8_sdpa_op.register_fake
def _(q, k, v, state, attn_scale):
    b, s, h, _ = q.shape
    return (torch.empty_like(q), torch.empty_like(q, dtype=torch.float8_e4m3fn),
            q.new_empty((1, 1, 1, 1), dtype=torch.float32), q.new_empty((b, h, s, 1), dtype=torch.float32))


@torch.library.custom_op("wanlora::fp8_sdpa_backward", mutates_args=())
def fp8_sdpa_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o8: torch.Tensor,
                         descale_o: torch.Tensor, stats: torch.Tensor, state: torch.Tensor, attn_scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_with_state(do.contiguous(), q, k, v, o8, descale_o, stats, attn_scale, state)


@fp8_sdpa_backward_op.register_fake
def _(do, q, k, v, o8, descale_o, stats, state, attn_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, state, attn_scale = inputs
    _, o8, descale_o, stats = output
    ctx.save_for_backward(q, k, v, o8, descale_o, stats, state)
    ctx.attn_scale = attn_scale


def _backward(ctx, grad_o, *_unused):
    q, k, v, o8, descale_o, stats, state = ctx.saved_tensors
    dq, dk, dv = fp8_sdpa_backward_op(grad_o, q, k, v, o8, descale_o, stats, state, ctx.attn_scale)
    return dq, dk, dv, None, None


fp8_sdpa_op.register_autograd(_backward, setup_context=_setup)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """Attention of bf16 [B, S, H, D] tensors (diffusers' layout) on cuDNN's FP8 kernels; bf16 output.

    `state` is the call site's amax state (`fresh_state`), kept by the caller across steps.
    """
    if q.dtype != torch.bfloat16:
        raise ValueError(f"{BACKEND_NAME} takes bf16 q, k, v (got {q.dtype}): the base must compute in bf16")
    attn_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return fp8_sdpa_op(q.contiguous(), k.contiguous(), v.contiguous(), state, attn_scale)[0]
