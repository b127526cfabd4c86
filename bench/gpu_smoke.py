"""The product's CUDA-only code paths on the tiny model: run first in any GPU session.

The CPU suite cannot reach the branches that need a GPU (device placement, pinned host mirrors,
quantization and recovery fitting on the device, the sampling pipeline), and the benchmarks run
full-size experts through a leaner harness. On 2026-11-25 the first run of the product on an H100
found `job.device: auto` crashing, and a review of those branches found nine more bugs (fixed with
CPU tests). This script runs the real train loop, resume, text cache and sampling on CUDA so the
next GPU session sees each path once:

    python3 bench/gpu_smoke.py                 # every check
    python3 bench/gpu_smoke.py nf4 sampling    # some of them
    DEV=cpu python bench/gpu_smoke.py          # dry run of the script here

Each check prints OK with what it measured, or FAIL with the exception and the frames that raised
it; the exit status is the number of failures. The device image has no dvc, whose ~100 dependencies
dvclive needs to import, so where dvclive is missing the trainer's metrics go to a logger that
keeps nothing: this checks placement and numerics, not metrics files (the CPU suite covers those).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import tempfile
import traceback
import types
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]


def _without_dvclive() -> None:
    """Let `wanlora.train.monitor` import where dvclive cannot be installed (see the docstring)."""
    try:
        import dvclive  # noqa: F401
    except ImportError:
        class Live:
            def __init__(self, *args, **kwargs):
                self.step = 0

            def log_metric(self, *args, **kwargs): ...

            def make_summary(self, *args, **kwargs): ...

            def end(self): ...

        stub = types.ModuleType("dvclive")
        # a spec, or importlib.util.find_spec (which diffusers' import checks call) raises ValueError
        stub.__spec__ = importlib.machinery.ModuleSpec("dvclive", None)
        stub.Live = Live  # type: ignore[attr-defined]
        sys.modules["dvclive"] = stub


_without_dvclive()

import torch  # noqa: E402

from _helpers import copy_workspace, make_workspace, tiny_params  # noqa: E402
from wanlora.errors import UserError  # noqa: E402
from wanlora.train import loop  # noqa: E402
from wanlora.train.distributed import init_distributed  # noqa: E402

DEV = os.environ.get("DEV", "auto")  # job.device as a user writes it; auto is the default
BASE = Path(tempfile.mkdtemp())
ROOT = BASE / "model"
WS = make_workspace(BASE / "ws", ROOT)
UINT4 = {"transformer": "uint4", "group_size": 32, "recovery": {"source": "fitted", "rank": 4, "calibration_samples": 2}}
NF4 = {"transformer": "nf4", "group_size": 32, "recovery": {"source": "none"}}


def run_train(tag: str, steps: int = 3, **sections) -> loop.Trainer:
    """The train loop on a fresh copy of the workspace, both experts switching every step."""
    ws = copy_workspace(WS, BASE / f"ws_{tag}")
    model = {"name_or_path": str(ROOT), **sections.pop("model", {})}
    params = tiny_params(ROOT, job={"device": DEV, "seed": 3}, model=model,
                         train={"steps": steps, **sections.pop("train", {})}, multistage={"switch_every": 1}, **sections)
    tr = loop.setup(params, ws, init_distributed(params.job.device))
    loop.train(tr)
    return tr


def losses(tr: loop.Trainer) -> list[float]:
    """The run's losses, which must be finite for the check to pass."""
    out = [round(r.get("loss_high", r.get("loss_low")), 4) for r in tr.history]
    assert out and all(0 < v < 100 for v in out), f"losses {out}"
    return out


def devices(tr: loop.Trainer) -> dict[str, set[str]]:
    """Where each expert's tensors ended up (the active one on the GPU, the other parked)."""
    return {e: {str(t.device) for t in m.state_dict().values()} for e, m in tr.experts.items()}


def ema_resume() -> tuple[int, set[str]]:
    tr = run_train("ema", steps=2, model={"dtype": "bf16"}, train={"ema": {"enabled": True}}, save={"every": 2})
    params = tr.params.model_copy(deep=True)
    params.train.steps = 4
    again = loop.setup(params, tr.workspace, tr.env)
    loop.load_checkpoint(again)
    loop.train(again)
    where = {str(v.device) for ema in again.emas.values() for v in ema.shadow.values()}
    assert again.step == 4 and where == {str(tr.env.device)}, f"step {again.step}, EMA on {where}"
    return again.step, where


def sampling(low_vram: bool) -> tuple[tuple[int, ...], dict]:
    """The evaluate stage's pipeline and validation loss on a bf16 base, resident or offloaded."""
    from wanlora.config import parse_params
    from wanlora.evaluate import sampling as s
    from wanlora.evaluate.validation import ValItem, fixed_noise_losses
    from wanlora.models.loading import load_transformer, load_vae
    from wanlora.models.text import load_text_embeds, pad_embeds
    from wanlora.stages._common import resolve_device

    device = torch.device(resolve_device(DEV))
    where = "cpu" if low_vram else str(device)
    experts = {e: load_transformer(ROOT, e, "bf16", where) for e in ("high", "low")}
    pipe = s.build_pipeline(experts["high"], experts["low"], load_vae(ROOT, "fp32", where), 0.875, 5.0)
    if low_vram and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    text = WS / "data/cache/text"
    emb = pad_embeds([load_text_embeds(text, "sks person walking in the park 0")]).to(torch.bfloat16)
    neg = pad_embeds([load_text_embeds(text, "")]).to(torch.bfloat16)
    cfg = parse_params({"sample": {"prompts": ["a"], "num_frames": 5, "width": 32, "height": 32, "steps": 2}}).sample
    video = s.generate(pipe, [emb], neg, cfg)[0]
    terms = fixed_noise_losses({"high": pipe.transformer, "low": pipe.transformer_2},
                               [ValItem("x", torch.randn(16, 2, 4, 4), emb[0])], [100, 900], 0.875, 1)
    val = {e: sum(v) / len(v) for e, v in terms.items()}
    assert video.shape == (5, 32, 32, 3) and all(0 < v < 100 for v in val.values()), (video.shape, val)
    return video.shape, val


def text_cache_float8() -> int:
    """The text cache's float8 encoder on the device the stage resolves (`stages/text_cache.py`
    passes `resolve_device(job.device)`, never "auto")."""
    from wanlora.models.text import run_stage
    from wanlora.stages._common import resolve_device

    out = BASE / "text_gpu"
    run_stage(root=ROOT, captions_manifest=WS / "data/captions/captions.jsonl", prompts=["a [trigger]"],
              trigger="sks", dropout=("sks", "person"), out_dir=out, dtype="bf16", quant="float8",
              device=resolve_device(DEV))
    return len(list(out.glob("*.safetensors")))


def qfloat8_refused() -> str:
    if DEV == "cpu":
        return "nothing to refuse on the CPU: no expert moves"
    try:
        run_train("q8", model={"dtype": "bf16"}, quantization={"transformer": "qfloat8"})
    except UserError as err:
        return f"refused as intended: {str(err)[:60]}..."
    raise AssertionError("qfloat8 with both experts on one GPU should stop in setup")


CHECKS: dict[str, Callable[[], object]] = {
    "bf16": lambda: (losses(tr := run_train("bf16", model={"dtype": "bf16"})), devices(tr)),
    "float8_fp8mm_offload": lambda: losses(run_train(
        "f8", model={"dtype": "bf16", "activation_offloading": True, "low_vram": True},
        quantization={"transformer": "float8", "fp8_matmul": True})),
    "uint4_fitted": lambda: losses(run_train("u4", model={"dtype": "bf16", "low_vram": True}, quantization=UINT4)),
    "nf4": lambda: (losses(tr := run_train("nf4", model={"dtype": "bf16", "low_vram": True}, quantization=NF4)),
                    devices(tr)),
    "ema_resume": ema_resume,
    "sampling": lambda: sampling(False),
    "sampling_low_vram": lambda: sampling(True),
    "text_cache_float8": text_cache_float8,
    "qfloat8_refused": qfloat8_refused,
}


def main(names: list[str]) -> int:
    unknown = set(names) - set(CHECKS)
    if unknown:
        sys.exit(f"unknown check(s) {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    failures = 0
    for name, check in CHECKS.items():
        if names and name not in names:
            continue
        try:
            print(f"[{name}] OK {check()}", flush=True)
        except Exception as err:  # report and go on: one run should show every broken path
            failures += 1
            print(f"[{name}] FAIL {type(err).__name__}: {str(err)[:400]}", flush=True)
            for frame in traceback.extract_tb(err.__traceback__)[-10:]:
                print(f"    {frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
