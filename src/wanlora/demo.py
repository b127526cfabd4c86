"""The bundled demo: generated clips, a tiny random model, the whole pipeline on CPU in minutes.

The demo goes through exactly the code a real run uses (same stages, same loader reading a
diffusers folder from disk); only the sizes are small. Its raw folder holds one bad file of each
common kind, so the reports show what skip-and-report looks like.
"""

from __future__ import annotations

from pathlib import Path

from wanlora.config import Params, parse_params
from wanlora.errors import UserError
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS
from wanlora.presets import write_params
from wanlora.workspace import commit, prepare, track_raw

DEMO_TRIGGER = "zqx"


class FolderTaken(UserError, FileExistsError):
    """The demo would write into a folder that holds someone's files."""


def demo_params(steps: int, variant: str = LEGACY_VARIANT) -> Params:
    """The smoke recipe (CPU, 64-pixel buckets, 9 frames), made long enough to show learning:
    more steps and checkpoints, two frame windows per clip, two prompts with and without the trigger.
    An I2V demo samples each prompt from the held-out clip's first frame; a TI2V 5B demo from text
    and from that frame, with its one transformer (no expert switching to set)."""
    from wanlora.presets import make_params

    tree = make_params("smoke", 24, model="models/tiny", trigger=DEMO_TRIGGER, variant=variant).model_dump(mode="json")
    tree["job"] |= {"name": "demo", "seed": 7}
    if len(VARIANTS[variant].experts) > 1:  # type: ignore[index]
        tree["multistage"]["switch_every"] = 5
    tree["save"] |= {"every": max(1, steps // 3), "keep_last": 3, "dtype": "fp32"}
    tree["train"] |= {"steps": steps, "lr": 1e-3, "caption_dropout": 0.1}
    tree["datasets"]["main"]["bucket"] |= {"frame_sampling": "window", "windows_per_clip": 2, "fps": 8}
    tree["sample"] |= {"prompts": ["[trigger] a red square moving right", "a blue circle on grey"],
                       "steps": 4, "fps": 8, "guidance_scale": 3.0, "validation_clips": 1,
                       "preview_steps": 4, "preview_num_frames": 9, "preview_width": 64, "preview_height": 64,
                       "preview_guidance_scale": 3.0}
    # run_cut.mp4 has no caption file: the tiny random captioner writes one (nonsense words, real path).
    # The smoke recipe leaves autocaption off (users' own clips, no tiny captioner), so switch it on here.
    tree["autocaption"] |= {"mode": "missing", "model": "models/tiny/captioner", "dtype": "fp32", "frames": 3, "frame_side": 64,
                            "max_new_tokens": 16, "repetition_penalty": 1.3}
    return parse_params(tree, "demo params")


def make_demo(folder: Path, steps: int = 120, variant: str = LEGACY_VARIANT) -> Params:
    """Create (or refresh) a demo workspace of `variant`; the raw clips and tiny model are made once
    (a tiny model of another variant already there is refused by the stages, naming both)."""
    from wanlora.media.synth import make_demo_raw
    from wanlora.models.tiny import make_tiny

    params = demo_params(steps, variant)
    if folder.exists() and any(folder.iterdir()) and not (folder / "params.yaml").exists():
        raise FolderTaken(f"{folder} exists and is not a wanlora workspace; pick a new folder")
    prepare(folder, params, own_repo=True)
    raw = folder / "data/raw"
    if not any(raw.iterdir()):
        make_demo_raw(raw, seed=0)
    if not (folder / "models/tiny/model_index.json").exists():
        make_tiny(folder / "models/tiny", seed=0, variant=variant)
    write_params(folder / "params.yaml", params, "wanlora demo")
    track_raw(folder, params)
    commit(folder, "wanlora demo workspace")
    return params
