"""What every stage's main() does first: find the workspace and load validated params."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from wanlora.config import Params, load_params
from wanlora.errors import UserError
from wanlora.report import console

WORKSPACE = Path(".")


def run(main: Callable[[], None]) -> None:
    """Run a stage; an error a person must fix prints as its message (file and fix), not a traceback.

    OpenCV's bundled FFmpeg logs its own lines ("moov atom not found") before our message about
    the same file says what it means and what to do; it is silenced unless the person asks for it.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when FFmpeg is first used
    try:
        main()
    except UserError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise SystemExit(1) from None


def load() -> Params:
    """Params of the workspace DVC runs the stage in (its current directory)."""
    return load_params(WORKSPACE / "params.yaml")


def resolve_device(device: str) -> str:
    """'auto' means the first CUDA device when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
