"""Quantized base weights for the Wan experts and the UMT5 encoder: trained through, never fused.

Modes (`quantization.transformer` in params.yaml):
- ``none``: bf16 as loaded.
- ``float8``: e4m3 weights with one fp32 scale per output channel (`Float8Linear`, ours). The
  forward dequantises to the activation dtype and runs a bf16 matmul, so numerics match bf16 up to
  the weight rounding on every device, CPU included.
- ``qfloat8``: optimum-quanto's qfloat8 (quantize + freeze), module by module.
- ``nf4``: bitsandbytes ``Linear4bit`` swapped in by hand (diffusers' BitsAndBytesConfig refuses to
  load a Wan transformer without a GPU; the hand swap works on CPU and GPU alike).
- ``uint4``: AI Toolkit's ``uint4`` (`UInt4Linear`, ours): torchao 0.10's UIntXWeightOnlyConfig,
  asymmetric, groups of 64 input features, zero point kept integer, all arithmetic in the weight's
  own dtype (bf16), exactly as AI Toolkit's bit-exact reimplementation in
  ``toolkit/util/uintx_quant.py`` does. A published accuracy-recovery adapter was trained against
  those exact rounded weights, so we reproduce the rounding op for op instead of importing torchao:
  torchao has dropped uintx, is not in our stack, and its int4 path is a silent no-op on CPU. A
  layer whose in_features is not a multiple of the group size stays bf16, as it does in AI Toolkit
  (torchao asserted, AI Toolkit's loop caught it).

Every quantized module subclasses ``nn.Linear`` (ours directly; bitsandbytes and quanto do too), so
peft's default dispatch wraps it with a LoRA layer whose forward calls the frozen base and adds the
trainable update: backward flows through the dequantised weight to the activations, never into it.
Merging a LoRA into a quantized base is refused (`forbid_fusion`): peft would add the delta to a
temporary dequantised copy and drop it silently (quanto), or requantise it and lose it in rounding.

Quantizing a 14B expert takes minutes, so `quantize_cached` stores the quantized tensors once as
safetensors plus a JSON record, keyed by the source, the settings and the wanlora version, and a
rerun loads them. Quantization runs on the GPU when there is one, one linear at a time: the bf16
expert never has to fit on the device.
"""

from __future__ import annotations

import abc
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor, nn

from wanlora import __version__
from wanlora.config import TextEncoderQType, TransformerQType
from wanlora.io import atomic_write_json, sha256_json
from wanlora.report import console
from wanlora.tensorfiles import save_streamed


#: Kept in full precision by default: the timestep/text conditioning and the final projection feed
#: every block's modulation (AI Toolkit excludes `condition_embedder*` and `proj_out*` for Wan 2.2);
#: the patch embedding is a Conv3d and the norms and `scale_shift_table` are not linears, listed so
#: a future conv/norm quantizer keeps them too.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "condition_embedder*",
    "proj_out*",
    "patch_embedding*",
    "scale_shift_table",
    "norm*",
)

#: Largest finite float8 e4m3 value: per-channel scales map each row's absmax onto it.
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_F32_EPS = torch.finfo(torch.float32).eps
#: Block sizes bitsandbytes' quantize_4bit accepts.
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Bumped whenever the cache layout or any quantizer's rounding changes, so old caches miss.
CACHE_FORMAT = 1


class FusionRefused(RuntimeError):
    """A LoRA merge into a quantized base was attempted; keep the LoRA separate instead."""


# ----------------------------------------------------------------------------- our modules
def _stash(t: Tensor) -> Tensor:
    """A tensor's raw bytes as uint8, so `model.to(dtype)` cannot recast scales or fp8 codes
    (Module._apply casts every floating buffer, float8 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _unstash(buf: Tensor, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
    return buf.view(dtype).view(*shape)


class QuantizedLinear(nn.Linear, metaclass=abc.ABCMeta):
    """Base of our weight-only quantized linears: frozen codes in buffers, dequantised per forward.

    Subclassing nn.Linear (without allocating its weight) is what lets peft and diffusers treat it
    as a linear: `weight` is a read-only property that returns the dequantised weight, so code that
    inspects shape, dtype or device keeps working; `compute_dtype` tells peft the adapter dtype.
    """

    kind: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.dequantize()

    @abc.abstractmethod
    def dequantize(self) -> Tensor:
        """The weight as the forward uses it, in `compute_dtype`, shape (out, in)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():  # the base is frozen: no graph for the weight, only for x
            w = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def record(self) -> dict[str, Any]:
        """What the cache needs besides the tensors to rebuild this module."""
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.compute_dtype).removeprefix("torch."),
        }


class _Fp8Matmul(torch.autograd.Function):
    """y = x·Wᵀ with both in e4m3 through torch._scaled_mm (row-wise scales); the backward to x
    uses the dequantised weight in the gradient's dtype, since the frozen base needs no weight
    gradient. Only tensors cross the Function boundary, so torch.compile traces it whole."""

    @staticmethod
    def forward(ctx, x2d: Tensor, codes: Tensor, w_scale: Tensor) -> Tensor:  # type: ignore[override]
        x_scale = (x2d.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        xq = (x2d.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        ctx.save_for_backward(codes, w_scale)
        return torch._scaled_mm(xq, codes.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x2d.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        codes, w_scale = ctx.saved_tensors
        return grad @ (codes.to(torch.float32) * w_scale.t()).to(grad.dtype), None, None


class Float8Linear(QuantizedLinear):
    """e4m3 weights, one fp32 scale per output channel: w ~ code * scale[out].

    By default the forward dequantises and runs a bf16 matmul (weights-only quantization: the
    activations stay exact). With `fp8_matmul` (see `enable_fp8_matmul`) bf16 activations are
    quantized per token to e4m3 too and the product runs on fp8 tensor cores: faster on
    Ada/Hopper GPUs, at the price of activation rounding.
    """

    kind = "float8"
    fp8_matmul = False

    @classmethod
    def quantize(cls, linear: nn.Linear, device: torch.device) -> Float8Linear:
        home = linear.weight.device
        w = linear.weight.detach().to(device, torch.float32)
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        codes = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        module = cls(linear.in_features, linear.out_features, linear.bias, linear.weight.dtype)
        module.register_buffer("qweight", _stash(codes).to(home))
        module.register_buffer("scale", _stash(scale).to(home))
        return module

    def dequantize(self) -> Tensor:
        codes = _unstash(self.qweight, torch.float8_e4m3fn, (self.out_features, self.in_features))
        scale = _unstash(self.scale, torch.float32, (self.out_features, 1))
        return (codes.to(torch.float32) * scale).to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.fp8_matmul and x.dtype == torch.bfloat16):
            return super().forward(x)
        codes = _unstash(self.qweight, torch.float8_e4m3fn, (self.out_features, self.in_features))
        w_scale = _unstash(self.scale, torch.float32, (1, self.out_features))
        y = _Fp8Matmul.apply(x.reshape(-1, self.in_features), codes, w_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def enable_fp8_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Run every `Float8Linear` of `model` on fp8 matmuls (True) or dequantise-then-bf16 (False).
    Needs a GPU of compute capability 8.9+ (Ada, Hopper) or the CPU. Returns the layer count."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    if enabled and layers:
        device = layers[0].qweight.device
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise RuntimeError(
                f"fp8 matmuls need compute capability 8.9+ (Ada/Hopper); {torch.cuda.get_device_name(device)} "
                "has less: keep them off (float8 weights still halve memory)"
            )
    for m in layers:
        m.fp8_matmul = enabled
    return len(layers)


def _pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes < 16 into bytes: first half of the flat array in the low nibbles, second half
    in the high ones (contiguous halves keep pack and unpack to two coalesced elementwise ops)."""
    flat = codes.reshape(-1)
    half = flat.numel() // 2
    return flat[:half] | (flat[half:] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.cat([packed & 0x0F, packed >> 4])


class UInt4Linear(QuantizedLinear):
    """AI Toolkit's uint4 (torchao 0.10 UIntXWeightOnlyConfig): asymmetric 4-bit groups along the
    input dimension, w ~ (code - zero_point) * scale, computed in the weight's own dtype."""

    kind = "uint4"
    qmax: ClassVar[int] = 15

    def __init__(self, in_features, out_features, bias, dtype, group_size: int):
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = group_size

    @classmethod
    def quantize(cls, linear: nn.Linear, group_size: int, device: torch.device) -> UInt4Linear:
        # Op for op as torchao's choose_qparams_affine / quantize_affine (ASYMMETRIC,
        # preserve_zero, INT zero-point domain), in the weight dtype, so codes match AI Toolkit's.
        home, dtype = linear.weight.device, linear.weight.dtype
        out_f, in_f = linear.out_features, linear.in_features
        groups = in_f // group_size
        w = linear.weight.detach().to(device).contiguous().view(out_f, groups, group_size)
        min_neg = torch.min(torch.amin(w, dim=2), torch.zeros((), dtype=dtype, device=device))
        max_pos = torch.max(torch.amax(w, dim=2), torch.zeros((), dtype=dtype, device=device))
        scale = torch.clamp((max_pos - min_neg) / float(cls.qmax), min=_F32_EPS)
        zero_point = torch.clamp(-torch.round(min_neg / scale), 0, cls.qmax).to(torch.int32)
        codes = torch.clamp(
            torch.round(w * (1.0 / scale.view(out_f, groups, 1))) + zero_point.view(out_f, groups, 1),
            0,
            cls.qmax,
        ).to(torch.uint8)
        module = cls(in_f, out_f, linear.bias, dtype, group_size)
        module.register_buffer("qweight", _pack_nibbles(codes).to(home))
        module.register_buffer("scale", _stash(scale).to(home))
        module.register_buffer("zero_point", zero_point.to(torch.uint8).to(home))
        return module

    def dequantize(self) -> Tensor:
        out_f, in_f, g = self.out_features, self.in_features, self.group_size
        groups = in_f // g
        scale = _unstash(self.scale, self.compute_dtype, (out_f, groups, 1))
        codes = _unpack_nibbles(self.qweight).view(out_f, groups, g).to(self.compute_dtype)
        codes -= self.zero_point.to(self.compute_dtype).view(out_f, groups, 1)
        return (codes * scale).view(out_f, in_f)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "group_size": self.group_size}


# --------------------------------------------------------------------- third-party modes
def _nf4(linear: nn.Linear, group_size: int, device: torch.device) -> nn.Module:
    """bitsandbytes NF4 with `group_size` as its block size (double-quantised absmax)."""
    import bitsandbytes as bnb

    home, dtype = linear.weight.device, linear.weight.dtype
    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=dtype, quant_type="nf4", device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach().to(device), requires_grad=False, quant_type="nf4", blocksize=group_size
    ).to(device)  # .to() quantizes
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return module.to(home)


def _qfloat8(linear: nn.Linear, device: torch.device) -> nn.Module:
    from optimum.quanto import qfloat8
    from optimum.quanto.nn import quantize_module as quanto_module

    home = linear.weight.device
    staged = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    staged.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)  # a copy:
    if linear.bias is not None:  # the caller's module is left where it is
        staged.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    module = quanto_module(staged, weights=qfloat8)
    module.freeze()
    return module.to(home)


def _quantizer(mode: str, group_size: int) -> Callable[[nn.Linear, torch.device], nn.Module | None]:
    if mode == "float8":
        return Float8Linear.quantize
    if mode == "uint4":
        return lambda lin, dev: (
            UInt4Linear.quantize(lin, group_size, dev) if lin.in_features % group_size == 0 else None
        )
    if mode == "nf4":
        return lambda lin, dev: _nf4(lin, group_size, dev)
    if mode == "qfloat8":
        return _qfloat8
    raise ValueError(f"quantization mode {mode!r} has no quantizer")


# ------------------------------------------------------------------------ discovery
def quant_kind(module: nn.Module) -> str | None:
    """The mode a module was quantized with, or None for a plain (or unsupported) module."""
    if isinstance(module, QuantizedLinear):
        return module.kind
    cls = type(module)
    if cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes"):
        return "nf4"
    if cls.__name__ == "QLinear" and cls.__module__.startswith("optimum.quanto"):
        return "qfloat8"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quant_kind(module) is not None


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear of `model` by qualified name (peft's `base_layer` hops included)."""
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


def dequantized_weight(module: nn.Module) -> Tensor:
    """The weight a (quantized or plain) linear really applies, shape (out, in), detached."""
    with torch.no_grad():
        kind = quant_kind(module)
        if isinstance(module, QuantizedLinear):
            return module.dequantize()
        if kind == "nf4":
            from bitsandbytes.functional import dequantize_4bit

            return dequantize_4bit(module.weight.data, module.weight.quant_state)
        if kind == "qfloat8":
            return module.weight.dequantize()
        return module.weight.detach()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def select_linears(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str]
) -> list[tuple[str, nn.Linear]]:
    """Plain linears to quantize: named by `include` (fnmatch patterns or names; None = all) and
    not by `exclude`. Already quantized modules are skipped, so quantizing twice is a no-op."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not is_quantized(m)
        and ".lora_" not in name  # never a LoRA's own A/B (quantize before injecting the LoRA)
        and (include is None or _matches(name, include))
        and not _matches(name, exclude)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _work_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_mode(mode: str, allowed: Sequence[str], what: str) -> None:
    if mode not in allowed:
        raise ValueError(f"{what}: unknown quantization mode {mode!r}; use one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------- entry points
def quantize_transformer(
    model: nn.Module,
    mode: TransformerQType,
    group_size: int = 64,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    device: str | torch.device | None = None,
    include: Sequence[str] | None = None,
) -> None:
    """Quantize `model`'s linears in place, one at a time on `device` (default: the GPU if present).

    Each linear's weight visits `device` alone and its quantized tensors return to where the weight
    lived, so a CPU-resident bf16 expert is quantized on a GPU with only one layer there at a time.
    `include` restricts quantization to some layers (AI Toolkit quantizes exactly the layers its
    accuracy-recovery adapter covers); `exclude` keeps layers in full precision. Both take fnmatch
    patterns over qualified module names (`blocks.3.attn1.to_q`).
    """
    _check_mode(mode, get_args(TransformerQType), "quantization.transformer")
    if mode == "none":
        return
    if mode == "uint4" and (group_size < 2 or group_size % 2):
        raise ValueError(f"quantization.group_size={group_size}: uint4 needs an even group size (64 as AI Toolkit)")
    if mode == "nf4" and group_size not in NF4_BLOCKSIZES:
        raise ValueError(
            f"quantization.group_size={group_size}: bitsandbytes nf4 takes block sizes {NF4_BLOCKSIZES}; use 64"
        )
    work = _work_device(device)
    quantizer = _quantizer(mode, group_size)
    skipped = []
    # names only: holding the modules would keep every bf16 weight alive until the end
    names = [name for name, _ in select_linears(model, include, exclude)]
    for name in track(names, description=f"quantizing {mode}", console=console, disable=len(names) < 50):
        new = quantizer(model.get_submodule(name), work)
        if new is None:
            skipped.append(name)
            continue
        new.requires_grad_(False)
        _set_submodule(model, name, new)  # the bf16 linear is freed here
    if skipped:
        console.print(
            f"[yellow]{mode}: {len(skipped)} linear(s) stay bf16 because in_features is not a multiple "
            f"of group_size={group_size}[/] (as in AI Toolkit), e.g. {skipped[0]}"
        )


def quantize_module(
    module: nn.Module,
    mode: TextEncoderQType,
    exclude: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> None:
    """Quantize a text encoder (UMT5) in place: only the 8-bit modes, which keep its embeddings
    faithful enough for cached prompts."""
    _check_mode(mode, get_args(TextEncoderQType), "quantization.text_encoder")
    quantize_transformer(module, mode, exclude=exclude, device=device)


# ------------------------------------------------------------------------ no fusion
def _refuse_merge(name: str, *args: Any, **kwargs: Any) -> None:
    raise FusionRefused(
        f"{name}: refusing to merge a LoRA into a quantized base (the update would be lost in "
        "rounding or dropped silently). Keep the LoRA as a separate file; merge only into bf16 weights."
    )


def forbid_fusion(model: nn.Module) -> int:
    """Make peft's `merge` (hence diffusers' `fuse_lora` and peft's `merge_adapter`) raise
    `FusionRefused` on every LoRA layer whose base is quantized. Returns how many were guarded.
    Call it right after injecting the LoRA."""
    from peft.tuners.lora import LoraLayer

    guarded = 0
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and is_quantized(m.get_base_layer()):
            m.merge = functools.partial(_refuse_merge, name)  # type: ignore[method-assign]
            guarded += 1
    return guarded


def _module_record(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, QuantizedLinear):
        return module.record()
    kind = quant_kind(module)
    dtype = module.compute_dtype if kind == "nf4" else module.weight.dtype  # quanto: the QTensor's dtype
    return {
        "kind": kind,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _build_module(rec: dict[str, Any], tensors: dict[str, Tensor], device: torch.device) -> nn.Module:
    """A quantized module from its cache record and its tensors (keys relative to the module)."""
    kind, dtype = rec["kind"], getattr(torch, rec["dtype"])
    in_f, out_f = rec["in_features"], rec["out_features"]
    bias = tensors.get("bias")
    if kind in ("float8", "uint4"):
        module = (
            Float8Linear(in_f, out_f, bias, dtype)
            if kind == "float8"
            else UInt4Linear(in_f, out_f, bias, dtype, rec["group_size"])
        )
        for name in ("qweight", "scale", "zero_point"):
            if name in tensors:
                module.register_buffer(name, tensors[name])
        return module.to(device)
    if kind == "nf4":
        import bitsandbytes as bnb

        module = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=dtype, quant_type="nf4", device="meta")
        stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data=tensors["weight"], quantized_stats=stats, requires_grad=False, device=device
        )
        if bias is not None:
            module.bias = nn.Parameter(bias.to(device), requires_grad=False)
        return module
    if kind == "qfloat8":
        from optimum.quanto import qfloat8
        from optimum.quanto.nn import quantize_module as quanto_module

        shell = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
        module = quanto_module(shell, weights=qfloat8).to_empty(device=device)
        module.load_state_dict(tensors)
        return module.requires_grad_(False)
    raise ValueError(f"unknown quantized module kind {kind!r} in the cache")


def cache_key(
    key: dict[str, Any], mode: str, group_size: int, exclude: Sequence[str], include: Sequence[str] | None
) -> dict[str, Any]:
    """Everything that changes the quantized tensors: the source identity (caller's `key`, e.g.
    path or hub id + revision + file hashes), mode, group size, layer selection, code version."""
    return {
        "source": key,
        "mode": mode,
        "group_size": group_size if mode in ("uint4", "nf4") else None,
        "exclude": list(exclude),
        "include": None if include is None else sorted(include),
        "wanlora": __version__,
        "format": CACHE_FORMAT,
    }


def save_quantized(model: nn.Module, folder: str | Path, key: dict[str, Any]) -> Path:
    """Write `model`'s quantized linears to `folder`/weights.safetensors, then `quant.json`
    (written last: its presence marks a complete cache entry)."""
    folder = Path(folder)
    modules = quantized_modules(model)
    tensors: dict[str, Tensor] = {}
    records = {}
    for name, module in modules.items():
        records[name] = _module_record(module)
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v
    save_streamed(folder / "weights.safetensors", tensors, {"wanlora_quant": json.dumps(key, sort_keys=True)})
    atomic_write_json(folder / "quant.json", {"key": key, "modules": records})
    return folder


def load_quantized(
    model: nn.Module, folder: str | Path, key: dict[str, Any] | None = None, device: torch.device | None = None
) -> int:
    """Swap the cached quantized linears of `folder` into `model` (whose bf16 linears they replace,
    on the device those lived on, or on `device` where they were never loaded: meta tensors).
    Checks the key and every shape; returns the module count."""
    from safetensors import safe_open

    folder = Path(folder)
    meta = json.loads((folder / "quant.json").read_text(encoding="utf-8"))
    if key is not None and meta["key"] != key:
        raise ValueError(f"{folder}: quantization cache was made for other settings; delete the folder to rebuild it")
    with safe_open(str(folder / "weights.safetensors"), framework="pt", device="cpu") as f:
        names = list(f.keys())
        for name, rec in meta["modules"].items():
            try:
                target = model.get_submodule(name)
            except AttributeError:
                target = None
            if not isinstance(target, nn.Linear) or (target.in_features, target.out_features) != (
                rec["in_features"], rec["out_features"]
            ):
                raise ValueError(
                    f"{folder}: cached layer {name} does not fit this model; delete the folder to requantize"
                )
            home = next(iter(target.parameters()), torch.empty(0)).device
            if home.type == "meta":
                if device is None:
                    raise ValueError(f"load_quantized: {name} was never loaded (meta); say which device it goes to")
                home = device
            prefix = name + "."
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in names if k.startswith(prefix)}
            module = _build_module(rec, tensors, home)
            module.requires_grad_(False)
            _set_submodule(model, name, module)
    return len(meta["modules"])


def quantize_cached(
    model_loader: Callable[[], nn.Module],
    cache_dir: str | Path,
    key: dict[str, Any],
    mode: TransformerQType,
    group_size: int = 64,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    include: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    partial_loader: Callable[[frozenset[str]], nn.Module] | None = None,
) -> nn.Module:
    """Load a model and quantize it, or load its quantized layers from the cache.

    The cache folder is `cache_dir/<hash of cache_key(...)>/`; a hit swaps the stored quantized
    tensors into a loaded model without quantizing. The loader still provides the unquantized
    parts (norms, embedders, excluded layers); `partial_loader`, given the names of the modules
    the cache holds, loads only those parts and leaves the rest on the meta device, so a hit
    never reads the bf16 weights it replaces (`wanlora.models.loading.load_transformer`'s `skip`).
    """
    if mode == "none":
        return model_loader()
    full = cache_key(key, mode, group_size, exclude, include)
    folder = Path(cache_dir) / sha256_json(full)[:20]
    if (folder / "quant.json").is_file():
        if partial_loader is None:
            model = model_loader()
            load_quantized(model, folder, full)
        else:
            cached = json.loads((folder / "quant.json").read_text(encoding="utf-8"))["modules"]
            model = partial_loader(frozenset(cached))
            home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
            load_quantized(model, folder, full, device=home)
            never = [n for n, p in model.named_parameters() if p.device.type == "meta"]
            if never:
                raise ValueError(f"{folder}: the cache does not hold {never[0]}; delete the folder to rebuild it")
        console.print(f"quantization: loaded {mode} weights from {folder}")
        return model
    model = model_loader()
    quantize_transformer(model, mode, group_size=group_size, exclude=exclude, device=device, include=include)
    save_quantized(model, folder, full)
    console.print(f"quantization: cached {mode} weights in {folder}")
    return model


def _tensor_bytes(t: Tensor) -> int:
    """Storage of a tensor as held: a wrapper subclass (quanto's QTensor) by its inner tensors,
    a bitsandbytes 4-bit parameter with its absmax statistics."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized codes, scales, unquantized weights)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total
