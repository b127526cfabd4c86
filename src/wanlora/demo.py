"""The bundled demo: generated clips, a tiny random model, the whole pipeline on CPU in minutes.

The demo goes through exactly the code a real run uses (same stages, same loader reading a
diffusers folder from disk); only the sizes are small. Its raw folder holds one bad file of each
common kind, so the reports show what skip-and-report looks like.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from wanlora.config import DatasetConfig, Params, parse_params
from wanlora.presets import write_params
from wanlora.workspace import commit, prepare, track_raw

DEMO_TRIGGER = "zqx"


def demo_params(steps: int) -> Params:
    """Params sized for a CPU: 64-pixel buckets, 9 frames, a few hundred tiny steps."""
    return parse_params({
        "job": {"name": "demo", "trigger_word": DEMO_TRIGGER, "device": "cpu", "seed": 7},
        "model": {"name_or_path": "models/tiny", "dtype": "fp32"},
        "multistage": {"switch_every": 5},
        "network": {"rank": 4, "alpha": 4},
        "save": {"every": max(1, steps // 3), "keep_last": 3, "dtype": "fp32"},
        "train": {"steps": steps, "optimizer": "adamw", "lr": 1e-3, "caption_dropout": 0.1,
                  "gradient_checkpointing": False},
        "datasets": {"main": DatasetConfig(
            folder="data/raw",
            bucket={"resolutions": [64], "num_frames": [9], "frame_sampling": "window",
                    "windows_per_clip": 2, "fps": 8},
        ).model_dump()},
        "sample": {"prompts": ["[trigger] a red square moving right", "a blue circle on grey"],
                   "steps": 4, "num_frames": 9, "width": 64, "height": 64, "fps": 8,
                   "guidance_scale": 3.0, "validation_samples": 2},
        "export": {"step": "best"},
    }, "demo params")


def make_demo(folder: Path, steps: int = 120) -> Params:
    """Create (or refresh) a demo workspace; the raw clips and tiny model are made once."""
    from wanlora.media.synth import make_demo_raw
    from wanlora.models.tiny import make_tiny

    params = demo_params(steps)
    if folder.exists() and any(folder.iterdir()) and not (folder / "params.yaml").exists():
        raise FileExistsError(f"{folder} exists and is not a wanlora workspace; pick a new folder")
    prepare(folder, params, own_repo=True)
    raw = folder / "data/raw"
    if not any(raw.iterdir()):
        make_demo_raw(raw, seed=0)
    if not (folder / "models/tiny/model_index.json").exists():
        make_tiny(folder / "models/tiny", seed=0)
    write_params(folder / "params.yaml", params, "wanlora demo")
    track_raw(folder, params)
    commit(folder, "wanlora demo workspace")
    return params


def repro(folder: Path) -> None:
    """Run `dvc repro` in the workspace with this interpreter's environment first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=folder, env=env)
    if result.returncode:
        raise SystemExit(f"`dvc repro` failed in {folder} (exit {result.returncode}); the log above names the stage")
