"""Activation offloading: saved activations wait in pinned host memory between forward and backward.

What it is for: at 81 frames of 1024x1024 (86k tokens) every block keeps its input for the
recompute (0.84 GiB) and, under `selective` checkpointing, its self-attention output (another
0.84 GiB): 67 GiB for 40 blocks, more than an 80 GB card has next to the weights. Both are
written once in the forward and read once in the backward, ~1 s of compute apart, so they can
sit in host memory instead: a block's 1.7 GiB crosses PCIe in ~40-70 ms each way (the H100
machine moved pinned memory to the device at ~47 GB/s), on a copy engine, while the GPU
computes. That buys `selective` (no attention recompute, ~20% of such a step) where only `full`
fitted before. musubi-tuner calls its version
`--gradient_checkpointing_cpu_offload`.

How: autograd's saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`) see every tensor
the forward saves for backward, including those a compiled block saves. A tensor of at least
`min_bytes` that is not a parameter or buffer of the model is copied to pinned host memory on a
side stream (the compute stream does not wait) and its device memory is released once the copy
is done (`record_stream`). In backward, the first unpack of a tensor also starts the copies of
the tensors packed just before it, up to `ahead_bytes`: backward unpacks in roughly the reverse
order of packing, so the next block's activations arrive while this block computes.

Weights are never moved: frozen weights are saved by every linear for its input gradient and
must stay where they are (`wanlora.models.accel.park_frozen` moves whole experts). A tensor that
several blocks save (the rotary tables, the text states) crosses once per forward.

Host memory: exact-size page-locked chunks (`pinned_buffer`), bump-allocated and reused by every
forward, because PyTorch's pinned allocator rounds each 0.84 GiB activation up to 1 GiB and keeps
a step's worth of such blocks cached: a first try at 81f@1024x1024 pinned ~85 GiB and the host
killed the process. One arena and one side stream per device serve every expert (`_Staging`):
they train one at a time. At most `max_host_bytes` are pinned for one forward (default: half the
memory the host has available when the expert is set up); activations beyond that stay on the GPU.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_FIRST_CHUNK, _MAX_CHUNK = 256 << 20, 4 << 30  # arena chunks double from the first up to the max
_ALIGN = 512
PREFETCH_BYTES = 2 << 30  # default `ahead_bytes`: fetched activations waiting for backward (plan.py counts them)


@dataclass(eq=False)
class _Held:
    """One offloaded tensor: its host copy, and its device copy once fetched back."""

    host: torch.Tensor
    device: torch.device
    nbytes: int
    forward: list[_Held]  # everything its forward offloaded, in pack order (itself included)
    index: int
    fetched: torch.Tensor | None = None
    ready: Any = None  # a CUDA event recorded after the fetch, None on CPU
    used: bool = False  # unpacked once: prefetching skips it (a second unpack fetches on demand)


def _dense(t: torch.Tensor) -> bool:
    """True when `t` covers its memory exactly once in some dimension order (contiguous up to a
    permutation), so a copy with the same strides has the same size."""
    expect = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


class _RegisteredPages(mmap.mmap):
    """Anonymous host pages registered with CUDA for as long as anything uses them.

    `torch.frombuffer` keeps this object alive while any tensor shares its memory, so the pages
    are unregistered exactly when the last view dies, and before they are unmapped. A registration
    left behind by freed memory is stale: the next allocation the C library places at that
    address (a `.cpu()` copy's destination, say) lies in a range CUDA still thinks is page-locked,
    and copies into it fail with "CUDA error: invalid argument" (seen on an H200 in
    `bench/gpu_smoke.py`: a checkpoint's `.cpu()` after an earlier trainer's host mirror was freed).
    """

    registered = False

    def __del__(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.registered = False


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of host memory, page-locked with `cudaHostRegister` when CUDA is there, exactly
    that size (PyTorch's pinned allocator would round up to a power of two and cache the block),
    and unregistered when the last tensor using it is freed (`_RegisteredPages`)."""
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    pages = _RegisteredPages(-1, nbytes)
    flat = torch.frombuffer(pages, dtype=torch.uint8)
    if torch.cuda.is_available():
        pages.address = flat.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(pages.address, nbytes, 0)
        if int(err) == 0:
            pages.registered = True
        else:  # still correct, only the copies become synchronous
            print(f"wanlora: cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}); host copies stay pageable")
    return flat


def host_available_bytes() -> int:
    """Memory the host could still give this process (MemAvailable), or 0 if unknown."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


class _Arena:
    """Bump allocation in pinned chunks; `reset` at each forward reuses them from the start.

    Reuse is safe without events: a forward's copies into the arena and the previous backward's
    copies out of it all run on the one side stream, in order."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.chunks: list[torch.Tensor] = []
        self.index = self.offset = 0

    def reset(self) -> None:
        self.index = self.offset = 0

    def take(self, nbytes: int) -> torch.Tensor:
        size = -(-nbytes // _ALIGN) * _ALIGN
        while self.index < len(self.chunks):
            chunk = self.chunks[self.index]
            if self.offset + size <= chunk.numel():
                self.offset += size
                return chunk[self.offset - size : self.offset - size + nbytes]
            self.index, self.offset = self.index + 1, 0
        grow = min(2 * self.chunks[-1].numel(), _MAX_CHUNK) if self.chunks else _FIRST_CHUNK
        chunk_bytes = max(size, grow)  # a tensor larger than a chunk gets one of its own size
        self.chunks.append(pinned_buffer(chunk_bytes) if self.pinned else torch.empty(chunk_bytes, dtype=torch.uint8))
        self.index, self.offset = len(self.chunks) - 1, size
        return self.chunks[-1][:nbytes]


@dataclass(eq=False)
class _Staging:
    """A device's side stream and host arena, shared by every `ActivationOffload` of the process.

    Experts train one at a time, so one arena sized for the largest forward serves them all (an
    arena each would pin both experts' activations, ~2x 60 GiB at 81f@1024², more than a 128 GB host
    has), and one stream keeps every copy into and out of it in order, which is what lets a forward
    reuse the arena without events."""

    stream: Any
    arena: _Arena


_STAGING: dict[torch.device, _Staging] = {}


def _staging(device: torch.device) -> _Staging:
    staged = _STAGING.get(device)
    if staged is None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        staged = _STAGING[device] = _Staging(stream, _Arena(pinned=stream is not None))
    return staged


def _storages(module: torch.nn.Module) -> set[int]:
    """Storages of the model's own tensors. A tensor subclass that wraps others (optimum-quanto's
    qfloat8 weights) has no storage of its own: its inner tensors count instead."""
    out, todo = set(), list(module.parameters()) + list(module.buffers())
    while todo:
        t = todo.pop()
        if is_traceable_wrapper_subclass(t):
            todo += [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        else:
            out.add(t.untyped_storage().data_ptr())
    return out


class ActivationOffload:
    """Saved-tensor hooks that park large activations of one forward in host memory.

    Use one per model, around each forward whose graph will be backpropagated:
    `with offload: loss = f(model(x)); loss.backward()` (the backward may also come after the
    block). Entering again starts a new forward and forgets the last one's bookkeeping.

    On CUDA the host buffers are pinned and copies are asynchronous on a side stream; on other
    devices (CPU tests) the same bookkeeping runs with plain synchronous copies.
    """

    def __init__(self, model: torch.nn.Module, min_bytes: int = 1 << 20, ahead_bytes: int = PREFETCH_BYTES,
                 max_host_bytes: int | None = None):
        self.model = model
        self.min_bytes = min_bytes
        self.ahead_bytes = ahead_bytes
        self.max_host_bytes = host_available_bytes() // 2 if max_host_bytes is None else max_host_bytes
        self.records: list[_Held] = []
        self._seen: dict[int, tuple[Any, _Held]] = {}
        self._skip: set[int] = set()
        self._fresh = False  # a forward has begun and has not packed yet: its first pack resets the arena
        self._hooks: Any = None
        self.offloaded_bytes = 0  # of the last forward, for logs and the benchmark

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ActivationOffload:
        self.records, self._seen, self.offloaded_bytes, self._fresh = [], {}, 0, True
        self._skip = _storages(self.model)  # parameters can move between forwards (expert parking)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    # ------------------------------------------------------------------ hooks
    def _pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if (is_traceable_wrapper_subclass(t)  # a quantized weight (quanto): no storage of its own to copy
                or nbytes < self.min_bytes or t.layout != torch.strided or not _dense(t)
                or t.untyped_storage().data_ptr() in self._skip):
            return t
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t:  # the same tensor object, saved again by another block
            return seen[1]
        if self.offloaded_bytes + nbytes > self.max_host_bytes:
            return t
        staged = _staging(t.device)
        if self._fresh:  # the last forward on this device was backpropagated: its host copies are spent
            staged.arena.reset()
            self._fresh = False
        stream = staged.stream
        # same strides as the original: compiled backward graphs assert the layout they saved
        host = staged.arena.take(nbytes).view(t.dtype).as_strided(t.shape, t.stride())
        if stream is None:
            host.copy_(t)
        else:
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete on the compute stream
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # its memory is reused only after the copy: the caller drops t now
        held = _Held(host, t.device, nbytes, self.records, len(self.records))
        self.records.append(held)
        self._seen[id(t)] = (weakref.ref(t), held)
        self.offloaded_bytes += nbytes
        return held

    def _fetch(self, held: _Held, needed: bool = False) -> None:
        if held.fetched is not None or (held.used and not needed):
            return
        stream = _staging(held.device).stream
        host = held.host
        if stream is None:
            held.fetched = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=held.device)
            held.fetched.copy_(host)
            return
        with torch.cuda.stream(stream):
            # Allocated from the side stream's pool, which the copy writes on. A block from the
            # compute stream's pool may still be in use by queued compute kernels (the allocator
            # only orders reuse within one stream): writing it from the side stream corrupts them.
            fetched = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=held.device)
            held.fetched = fetched.copy_(host, non_blocking=True)
            held.ready = torch.cuda.Event()
            held.ready.record(stream)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Held):
            return packed
        self._fetch(packed, needed=True)
        packed.used = True
        budget = self.ahead_bytes
        for earlier in reversed(packed.forward[: packed.index]):  # the ones backward needs next
            if budget <= 0:
                break
            budget -= earlier.nbytes
            self._fetch(earlier)
        out = packed.fetched
        if packed.ready is not None:
            compute = torch.cuda.current_stream(packed.device)
            compute.wait_event(packed.ready)
            out.record_stream(compute)  # allocated on the side stream, used and freed on this one
        # an unpacked tensor may be unpacked again (retain_graph): keep the host copy, drop the rest
        packed.fetched, packed.ready = None, None
        return out


def offload_context(expert: torch.nn.Module) -> Any:
    """The expert's `ActivationOffload` (set by `wanlora.models.accel.apply_accel`), or None."""
    return getattr(expert, "_wanlora_activation_offload", None)
