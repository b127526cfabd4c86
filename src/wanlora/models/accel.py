"""Speed levers applied to one Wan expert (a diffusers `WanTransformer3DModel`, LoRA already injected).

What each lever buys was measured on an H100 with full-size random weights (bench/RESULTS.md):

- **Activation checkpointing per block**, three modes. `full` recomputes the whole block in
  backward (least memory). `selective` recomputes everything except the *self-attention*
  output (and its log-sum-exp): attention is the one op whose recomputation costs more than the
  memory it holds (O(N^2) work for N*dim bytes), so keeping it removes ~11% of a step's FLOPs
  for ~N*dim*2 bytes a block. Cross-attention (512 text tokens) is cheap and is recomputed.
  `none` keeps every activation (fastest, only for small clips).
- **Regional torch.compile**: each transformer block compiled on its own. The 40 blocks share one
  class, so one compilation serves all of them (the first step pays ~30-60 s); what it buys is
  the fusion of the fp32 norm/modulation/residual elementwise work around the matmuls, which eager
  runs as dozens of memory-bound kernels per block.
- **SDPA backend**: a process-wide preference for PyTorch's cuDNN, FlashAttention or
  memory-efficient kernel. `auto` leaves PyTorch's own choice, which on an H100 with torch 2.11
  already picks cuDNN for Wan's head size.

The levers keep the model's state-dict keys and outputs: the block's class is swapped for a
subclass whose forward adds checkpointing, nothing else is renamed, so peft/diffusers LoRA
saving and loading see the same module tree. Apply them once, after the LoRA is injected and
before the optimizer is built, and do not also call diffusers' `enable_gradient_checkpointing`
(that would checkpoint twice; `apply_accel` turns it off).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from wanlora.config import Params
from wanlora.errors import UserError
from wanlora.models.activation_offload import ActivationOffload, pinned_buffer

Checkpointing = Literal["none", "full", "selective"]
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]

_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


@dataclass(frozen=True)
class AccelSettings:
    """Which levers to apply to an expert.

    checkpointing: `none`, `full` or `selective` (keep self-attention outputs; see module doc).
    compile: compile each transformer block (GPU only: on CPU it is slow to build and buys nothing).
    attention_backend: SDPA backend preference; `auto` keeps PyTorch's choice.
    activation_offloading: keep saved activations in host memory between forward and backward
    (`wanlora.models.activation_offload`).
    """

    checkpointing: Checkpointing = "selective"
    compile: bool = False
    attention_backend: AttentionBackend = "auto"
    activation_offloading: bool = False

    def __post_init__(self) -> None:
        if self.checkpointing not in ("none", "full", "selective"):
            raise ValueError(f"checkpointing={self.checkpointing!r}: use none, full or selective")
        if self.attention_backend not in ("auto", "cudnn", "flash", "efficient", "math"):
            raise ValueError(
                f"attention_backend={self.attention_backend!r}: use auto, cudnn, flash, efficient or math"
            )


def settings_from_params(params: Params, checkpointing: Checkpointing | None = None) -> AccelSettings:
    """The levers a params.yaml asks for.

    `train.gradient_checkpointing` names the mode (true is read as `selective`),
    unless `checkpointing` overrides it (the planner passes `full` when selective does not fit).
    Compilation is off under `model.layer_offloading`: block offloading swaps the block's weights
    inside its forward (`wanlora.train.offload`), which a compiled block would trace into.
    """
    if checkpointing is None:
        checkpointing = params.train.gradient_checkpointing
    return AccelSettings(
        checkpointing=checkpointing,
        compile=params.model.compile and not params.model.layer_offloading,
        attention_backend=params.model.attention_backend,
        activation_offloading=params.model.activation_offloading,
    )


def _keep_self_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: save self-attention kernels' outputs, recompute the rest.

    Self- vs cross-attention is told apart by sequence lengths (query length == key length):
    the cross-attention output is as large as the self-attention one but ~N/512 times cheaper to
    recompute, so saving it would spend memory for nothing.
    """
    if op in _ATTENTION_OPS and args[0].shape[-2] == args[1].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_selective_context = functools.partial(create_selective_checkpoint_contexts, _keep_self_attention)


@functools.cache
def _accelerated_class(block_cls: type) -> type:
    """A subclass of the block's class whose forward runs under the block's checkpoint mode.

    One subclass per block class (cached), so every block of a model has the same class and the
    same forward code: torch.compile then builds one graph for all of them.
    """

    class Accelerated(block_cls):  # type: ignore[misc, valid-type]
        _wanlora_checkpointing: Checkpointing = "none"

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            mode = self._wanlora_checkpointing
            if mode == "none" or not torch.is_grad_enabled():
                return super().forward(*args, **kwargs)
            extra = {"context_fn": _selective_context} if mode == "selective" else {}
            return checkpoint(super().forward, *args, use_reentrant=False, **extra, **kwargs)

    Accelerated.__name__ = Accelerated.__qualname__ = f"Accelerated{block_cls.__name__}"
    return Accelerated


def set_attention_backend(backend: AttentionBackend) -> None:
    """Prefer one SDPA kernel family process-wide (CUDA only; `auto` restores PyTorch's defaults).

    Only the chosen kernel is enabled, so an input it cannot take fails loudly instead of falling
    back to the O(N^2)-memory math kernel, which would run a 32k-token clip out of memory anyway.
    """
    cuda = torch.backends.cuda
    wanted = {
        "cudnn": cuda.enable_cudnn_sdp,
        "flash": cuda.enable_flash_sdp,
        "efficient": cuda.enable_mem_efficient_sdp,
        "math": cuda.enable_math_sdp,
    }
    for name, enable in wanted.items():
        enable(backend in ("auto", name))


def apply_accel(expert: torch.nn.Module, settings: AccelSettings) -> torch.nn.Module:
    """Apply the levers to an expert in place and return it.

    Raises ValueError when the model has no `blocks` list of transformer blocks (not a Wan expert).
    """
    blocks = getattr(expert, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(expert).__name__} has no transformer `blocks`; apply_accel needs a Wan expert")
    if getattr(expert, "gradient_checkpointing", False):
        expert.disable_gradient_checkpointing()  # ours replaces it; both would recompute twice
    for block in blocks:
        base = type(block)
        if base.__name__.startswith("Accelerated"):
            base = base.__mro__[1]
        block.__class__ = _accelerated_class(base)
        block._wanlora_checkpointing = settings.checkpointing
        if settings.compile:
            block.compile()
    expert._wanlora_activation_offload = ActivationOffload(expert) if settings.activation_offloading else None
    if torch.cuda.is_available():
        set_attention_backend(settings.attention_backend)
    return expert


# ------------------------------------------------------------------ expert parking in host memory
_ALIGN = 64


def _frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters that do not train, and buffers, each once (tied tensors share storage)."""
    seen: set[int] = set()
    out = []
    for t in [p for p in module.parameters() if not p.requires_grad] + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _host_mirror(module: torch.nn.Module) -> None:
    """Give every frozen tensor of `module` a copy in one page-locked host buffer, made once.

    One flat buffer registered with CUDA (`cudaHostRegister`) instead of a `pin_memory()` per
    tensor: PyTorch's pinned allocator rounds each block up to a power of two (a 141 MB FFN weight
    takes 256 MB, ~45% extra over a Wan expert) and pins slowly block by block. The copy is valid
    for the whole run because these tensors never change (frozen base weights, quantized codes,
    rotary tables).
    """
    tensors = _frozen_tensors(module)
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    flat = pinned_buffer(total)
    for t, off, n in zip(tensors, offsets, sizes):
        host = flat[off : off + n].view(t.dtype).view(t.shape)
        host.copy_(t.data)
        t._wanlora_host = host  # type: ignore[attr-defined]
    module._wanlora_host_flat = flat  # keeps the buffer alive as long as the module


QFLOAT8_MOVES = (
    "quantization.transformer: qfloat8 experts cannot move between the GPU and host memory, which "
    "training both experts on one GPU, model.low_vram and model.layer_offloading need. Fix: use float8 "
    "(same size, faster and closer to bf16 on NVIDIA GPUs, bench/RESULTS.md), or train one expert per "
    "process (multistage.train_high_noise / train_low_noise, or expert-parallel on 2+ GPUs)")


def _refuse_wrapped(module: torch.nn.Module) -> None:
    """Stop before moving an expert whose frozen weights wrap others (optimum-quanto's qfloat8):
    `t.data = ...` never reaches the wrapped codes, so parking would leave them on the GPU and a
    fetch would leave a host-quantized expert's codes in host memory. Moving them needs a GPU run
    to validate; until then the message names the working choices."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if any(is_traceable_wrapper_subclass(t) for t in _frozen_tensors(module)):
        raise UserError(QFLOAT8_MOVES)


def park_frozen(module: torch.nn.Module, where: str, device: torch.device, non_blocking: bool) -> None:
    """Mover for `wanlora.train.experts.ExpertPlacer`: 'host' parks an expert, 'device' fetches it.

    Parking costs nothing after the first time: the frozen tensors simply point at their host
    mirror again (no device-to-host copy, no pinning). Fetching is one host-to-device copy from
    page-locked memory, asynchronous when `non_blocking`. Trainable tensors (the LoRA) never move.
    A bitsandbytes 4-bit weight's quantization state (absmax, code: plain attributes, which
    `t.data =` leaves behind) follows it to the device; parked, it stays there (a few % of the codes).
    """
    if where not in ("host", "device"):
        raise ValueError(f"where={where!r}: use 'host' or 'device'")
    _refuse_wrapped(module)
    if where == "host" and getattr(module, "_wanlora_host_flat", None) is None:
        _host_mirror(module)
    for t in _frozen_tensors(module):
        host = getattr(t, "_wanlora_host", None)
        if where == "host":
            if host is not None and t.data_ptr() != host.data_ptr():
                t.data = host
        elif t.device != device:
            t.data = (host if host is not None else t.data).to(device, non_blocking=non_blocking)
            if getattr(t, "quant_state", None) is not None:
                t.quant_state.to(device)
