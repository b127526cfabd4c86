"""Shared pieces of the GPU benchmarks: shapes, random inputs, timing, memory, profiles, the table.

Every benchmark process measures one configuration and appends one JSON row to `rows.jsonl` in
its output folder; `python bench/common.py table DIR` prints the markdown table of all rows. One
process per configuration keeps an out-of-memory in one from spoiling the memory numbers or the
allocator state of the next.

Geometry and FLOPs come from `wanlora.models.geometry` (the same numbers the planner uses).
MFU = useful FLOPs (forward, input-gradient backward, attention backward; recomputation not
counted) / (s/step x 790 TFLOP/s, the bf16 dense matmul rate measured on these H100s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wanlora.io import atomic_write_text
from wanlora.models.condition import condition_input
from wanlora.models.geometry import CONFIGS, TINY_CONFIGS, latent_shape, tokens, train_flops
from wanlora.models.variant import VARIANTS, Variant

PEAK_TFLOPS = 790.0
TEXT_LEN = 512
GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """A clip size: frames (4n+1) x height x width in pixels."""

    frames: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.frames}f@{self.width}x{self.height}"

    @property
    def slug(self) -> str:
        """The label as a file-name part (letters, digits, '.', '_', '-' only)."""
        return f"{self.frames}f_{self.width}x{self.height}"


def geometry(tiny: bool, variant: str = "t2v-a14b") -> dict[str, Any]:
    """The expert config of a Wan 2.2 variant: full size, or the two-layer test model for CPU dry runs."""
    return (TINY_CONFIGS if tiny else CONFIGS)[variant]


def variant_of(cfg: dict[str, Any]) -> Variant:
    """The variant whose transformer takes `cfg`'s input channels (16 T2V, 36 I2V, 48 TI2V 5B)."""
    return next(v for v in VARIANTS.values() if v.in_channels == cfg["in_channels"])


def device_and_dtype(tiny: bool) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if not tiny:
        sys.exit("no CUDA device: full-size benchmarks need a GPU; use --tiny for a CPU dry run")
    return torch.device("cpu"), torch.float32


def random_batch(
    config: dict[str, Any], shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0,
    text_tokens: int = 120,
) -> dict[str, torch.Tensor]:
    """A clean latent and a text embedding as the caches hold them, on the device.

    The text is `text_tokens` random embeddings zero-padded to 512, which is what WanPipeline and
    our text cache feed the expert (real tokens, then padding), never an all-zero input.
    """
    v = variant_of(config)
    g = torch.Generator(device="cpu").manual_seed(seed)
    c, f, h, w = latent_shape(shape.frames, shape.height, shape.width, v.latent_channels, v.spatial_factor)
    latent = torch.randn(1, c, f, h, w, generator=g)
    text = torch.zeros(1, TEXT_LEN, config["text_dim"])
    text[:, :text_tokens] = torch.randn(1, text_tokens, config["text_dim"], generator=g)
    batch = {"latent": latent.to(device, dtype), "text": text.to(device, dtype)}
    if v.condition_channels:  # I2V A14B: frame mask and the start image's latent, as the latent cache holds them
        batch["condition"] = condition_input(torch.randn(c, f, h, w, generator=g))[None].to(device, dtype)
    return batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each timed step (after `warmup` untimed ones), synchronised at step ends.

    A training step ends in an optimizer update the next step depends on, so wall time between
    synchronisations is the honest step time; the first warm-up step also pays compilation.
    """
    for i in range(warmup):
        t0 = time.perf_counter()
        step(i)
        sync(device)
        print(f"  warm-up step {i}: {time.perf_counter() - t0:.2f} s", flush=True)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
        print(f"  step {i}: {times[-1]:.3f} s", flush=True)
    return times


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> tuple[float, float]:
    """(max allocated, max reserved) GiB since the last reset."""
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def profile_step(step: Callable[[int], Any], device: torch.device, top: int = 12) -> str:
    """One step under torch.profiler: the top GPU kernels by time and their share of kernel time.

    Only kernel events count (operator-level rows repeat their kernels' time); on CPU, operators.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step(10_000)
        sync(device)
    if cuda:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        key = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        key = lambda e: e.self_cpu_time_total  # noqa: E731
    events.sort(key=key, reverse=True)
    total = sum(key(e) for e in events) or 1.0
    lines = [f"time in kernels: {total / 1e6:.3f} s", "| share | ms | calls | kernel |", "|---|---|---|---|"]
    for e in events[:top]:
        name = e.key.replace("|", "/")[:90]
        lines.append(f"| {100 * key(e) / total:.1f}% | {key(e) / 1e3:.1f} | {e.count} | `{name}` |")
    return "\n".join(lines)


def write_profile(step: Callable[[int], Any], device: torch.device, path: Path) -> None:
    """Profile one step (`profile_step`), write the summary to `path` and print it."""
    summary = profile_step(step, device)
    atomic_write_text(path, summary + "\n")
    print(summary)


@dataclass
class Row:
    """One configuration's measurement, as the table and the planner's test read it."""

    config: str
    shape: str
    tokens: int
    s_step: float | None
    peak_alloc_gib: float | None
    peak_reserved_gib: float | None
    mfu: float | None
    device: str
    note: str = ""
    times: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def make_row(
    config: str, cfg: dict[str, Any], shape: Shape, times: list[float], device: torch.device,
    note: str = "", experts_per_step: float = 1.0, extra: dict[str, Any] | None = None,
) -> Row:
    v = variant_of(cfg)
    n = tokens(shape.frames, shape.height, shape.width, tuple(cfg["patch_size"]), v.spatial_factor)
    s = statistics.median(times) if times else None
    flops = train_flops(cfg, n, TEXT_LEN, v.expand_timesteps) * experts_per_step
    alloc, reserved = peak_gib(device)
    mfu = flops / (s * PEAK_TFLOPS * 1e12) if s and device.type == "cuda" else None
    return Row(config, shape.label, n, s, alloc, reserved, mfu, device_name(device), note, times, extra or {})


def failed_row(config: str, cfg: dict[str, Any], shape: Shape, device: torch.device, err: BaseException) -> Row:
    """A row for a configuration that did not run (out of memory, say), with the reason."""
    n = tokens(shape.frames, shape.height, shape.width, tuple(cfg["patch_size"]), variant_of(cfg).spatial_factor)
    alloc, reserved = peak_gib(device)
    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__
    return Row(config, shape.label, n, None, alloc, reserved, None, device_name(device), reason)


def append_row(out_dir: Path, row: Row) -> None:
    """Add a row to out_dir/rows.jsonl (rewritten whole and atomically: concurrent writers are not a case here)."""
    path = out_dir / "rows.jsonl"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(asdict(row), sort_keys=True) + "\n")
    print("ROW " + json.dumps(asdict(row), sort_keys=True), flush=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of RESULTS.md, one line per row, in the order measured."""
    head = "| config | shape | tokens | s/step (median) | peak alloc GiB | peak reserved GiB | MFU | device | note |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['shape']} | {r['tokens']} | {_fmt(r['s_step'], '.3f')} | "
            f"{_fmt(r['peak_alloc_gib'], '.1f')} | {_fmt(r['peak_reserved_gib'], '.1f')} | "
            f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'%' if r['mfu'] is not None else ''} | "
            f"{r['device']} | {r['note']} |"
        )
    return "\n".join(lines)


DEFAULT_WARMUP, DEFAULT_STEPS = 2, 5


def step_counts(args: argparse.Namespace, warmup: int | None = None, steps: int | None = None) -> tuple[int, int]:
    """(warm-up, timed) steps: the command line wins, then a configuration's own counts, then defaults."""
    pick = lambda given, own, default: next(v for v in (given, own, default) if v is not None)  # noqa: E731
    return pick(args.warmup, warmup, DEFAULT_WARMUP), pick(args.steps, steps, DEFAULT_STEPS)


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="two-layer model (CPU dry run of the harness)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")), help="rows.jsonl folder")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, or the configuration's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, or the configuration's)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler summary of one step")
    return p


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "table":
        sys.exit("usage: python bench/common.py table DIR_WITH_rows.jsonl")
    print(table(read_rows(Path(sys.argv[2]) / "rows.jsonl")))
