"""Per-stage GPU cap and measurements for `bench/run_tier.sh` (on PYTHONPATH only there).

Python imports `sitecustomize` at start-up, so every stage process that `dvc repro` launches
(`python -P stages/<name>.py`) passes through here without any change to the product: for the
stages that use the GPU, the CUDA caching allocator is capped at `TIER_GPU_GIB` GiB
(`torch.cuda.set_per_process_memory_fraction`, the way a 24 GB card would stop it), and at exit
each stage appends one JSON line to `TIER_LOG`: wall time, peak GPU memory allocated and reserved
(`torch.cuda.max_memory_*`: the allocator's view, without the ~0.5 GiB CUDA context) and peak host
RSS (`ru_maxrss`, page-locked host mirrors included). Processes other than stages are untouched.
"""

import atexit
import json
import os
import resource
import sys
import time

_T0 = time.time()
_STAGE = next((a.rsplit("/", 1)[-1].removesuffix(".py") for a in sys.argv[:1] if "stages/" in a), None)
_GPU_STAGES = {"text_cache", "latent_cache", "train", "evaluate", "export"}


def _cap() -> None:
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["TIER_GPU_GIB"]) * 2**30 / total))


def _record() -> None:
    row = {"stage": _STAGE, "start": round(_T0, 1), "wall_s": round(time.time() - _T0, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "children_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    with open(os.environ["TIER_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if _STAGE is not None and os.environ.get("TIER_LOG"):
    if _STAGE in _GPU_STAGES and os.environ.get("TIER_GPU_GIB"):
        _cap()
    atexit.register(_record)
