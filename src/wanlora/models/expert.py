"""The frozen base of one expert exactly as training sees it, for the trainer and the sampler.

One function so that evaluation samples and validation losses come from the base the LoRA was
trained against: the same quantized weights (from the same cache, never quantized twice), the
same accuracy-recovery correction or AI Toolkit adapter, and the same fp8 matmul setting.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wanlora.config import Params
from wanlora.train.timesteps import Expert


def load_base(root: Path, expert: Expert, params: Params, workspace: Path, where: str | torch.device,
              calib: list[dict] | None = None, *, work: str | torch.device | None = None,
              sampling: bool = False) -> torch.nn.Module:
    """Load `expert` from the model folder `root` into `where` and apply `params.quantization`.

    calib: forward kwargs to fit a 4-bit correction on (the trainer's), on `where`; with `sampling`
    nothing is fitted and the trainer's cached correction is reused
    (`prepare_quantized_expert(reuse_only)`). A base to quantize is read into host memory and
    quantized one linear at a time on `work` (default: the GPU if present) before it moves to
    `where`: the whole bf16 expert (28 GB for A14B) never sits on the GPU, which a 24 GB card could
    not hold. A quantized-cache hit reads only the tensors the cache lacks, straight into `where`
    (`load_transformer(skip=...)`).
    """
    from wanlora.models.loading import EXPERT_FOLDERS, load_transformer, model_identity
    from wanlora.models.quant import enable_fp8_matmul
    from wanlora.models.recovery import prepare_quantized_expert, weights_from_safetensors

    part, dtype = EXPERT_FOLDERS[expert], params.model.dtype
    quant = params.quantization.model_copy(update={"cache_dir": str(workspace / params.quantization.cache_dir)})
    read_to = "cpu" if quant.transformer != "none" else str(where)
    model = prepare_quantized_expert(
        lambda: load_transformer(root, expert, dtype, read_to), quant, expert,
        {"model": model_identity(root, part), "dtype": dtype},
        weights=None if sampling else weights_from_safetensors(root / part), calib_inputs=calib, device=work,
        home=where, partial_loader=lambda skip: load_transformer(root, expert, dtype, str(where), skip=skip),
        reuse_only=sampling,
    )
    if params.quantization.fp8_matmul:
        enable_fp8_matmul(model)
    return model
