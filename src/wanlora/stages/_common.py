"""What every stage's main() does first: find the workspace and load validated params."""

from __future__ import annotations

from pathlib import Path

from wanlora.config import Params, load_params

WORKSPACE = Path(".")


def load() -> Params:
    """Params of the workspace DVC runs the stage in (its current directory)."""
    return load_params(WORKSPACE / "params.yaml")


def resolve_device(device: str) -> str:
    """'auto' means the first CUDA device when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
