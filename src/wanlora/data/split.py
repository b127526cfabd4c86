"""Which clips are held out of training: chosen once, in a file that train and evaluate both read.

A validation loss means something only on clips the LoRA never saw. The unit held out is the
whole clip (or image), never a window: the other windows (and the flipped copy) of a held-out clip
would otherwise train on the same frames. The `split` stage writes `data/split/validation.json`;
the train stage leaves its clips out (`wanlora.data.dataset`), the evaluate stage scores exactly
its listed samples, so the two cannot disagree, and DVC reruns both when the choice changes.

Where the held-out clips come from:
- datasets with `role: validation` (never trained on; diffusion-pipe's eval datasets), else
- `sample.validation_clips` clips of the training datasets, by a seeded shuffle of the sorted
  clip ids (`job.seed`), at most a fifth of them: with 4 clips, holding one out costs a quarter of
  the data, and a LoRA of 3 clips is not the one the user asked for.
With too few clips for that, nothing is held out and the loss is measured on training clips
instead; `basis` says so, and every page and header that shows the loss carries the label.

Beside the held-out clips the file lists as many training clips (same shuffle, disjoint), scored
at the same timesteps and noise: the gap between the two curves is the overfitting signal. Each
clip is scored through one sample (its first unflipped window), so the cost does not grow with
`windows_per_clip`. Only clips with a caption and a latent cache can be scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from wanlora.config import Params
from wanlora.io import atomic_write_json, read_jsonl
from wanlora.pipeline import SPLIT_FILE
from wanlora.report import InputError

MAX_HELD_SHARE = 5  # hold out at most one clip in this many
HELD_OUT, TRAINING_CLIPS, NONE = "held_out", "training_clips", "none"
HELD_OUT_REASON = f"held out for validation ({SPLIT_FILE})"  # what a LoRA's lineage says of these samples
BASIS_LABEL = {HELD_OUT: "held-out clips", TRAINING_CLIPS: "training clips (nothing held out)", NONE: "none"}


@dataclass(frozen=True)
class Split:
    """The parsed split file (see module doc)."""

    basis: str  # held_out | training_clips | none
    reason: str
    held_out_clips: tuple[str, ...]
    validation_samples: tuple[str, ...]  # one per held-out clip
    training_samples: tuple[str, ...]  # one per scored training clip


def _scored_sample(samples: list[dict]) -> str:
    """The sample a clip is scored through: its first unflipped window."""
    return min(samples, key=lambda s: (bool(s.get("flip")), len(s["id"]), s["id"]))["id"]


def choose_split(samples: list[dict], captioned: set[str], params: Params) -> dict:
    """The split record for these manifests and params; a pure function (see module doc)."""
    roles = {name: d.role for name, d in params.datasets.items()}
    cached = {name for name, d in params.datasets.items() if d.cache_latents}
    by_clip: dict[str, list[dict]] = {}
    for s in samples:
        if s["clip_id"] in captioned:
            by_clip.setdefault(s["clip_id"], []).append(s)
    validation = sorted(c for c, ss in by_clip.items() if roles.get(ss[0]["dataset"]) == "validation")
    training = sorted(c for c, ss in by_clip.items() if roles.get(ss[0]["dataset"]) != "validation")
    scorable = [c for c in training if by_clip[c][0]["dataset"] in cached]
    order = list(scorable)
    random.Random(params.job.seed).shuffle(order)
    want = params.sample.validation_clips
    if validation:
        held, basis = validation, HELD_OUT
        names = sorted({by_clip[c][0]["dataset"] for c in validation})
        reason = f"{len(held)} clip(s) of the validation dataset(s) {', '.join(names)}; never trained on"
    elif want == 0:
        held, basis, reason = [], NONE, "sample.validation_clips is 0: no validation loss"
    else:
        n = min(want, len(training) // MAX_HELD_SHARE, len(scorable))
        held = sorted(order[:n])
        basis = HELD_OUT if n else TRAINING_CLIPS
        if n == want:
            reason = f"{n} of {len(training)} clip(s) held out by a seeded choice (job.seed {params.job.seed})"
        elif n:
            reason = (f"{n} clip(s) held out, not the {want} asked for: at most one clip in {MAX_HELD_SHARE} "
                      f"of {len(training)} is held out")
        else:
            reason = (f"only {len(training)} clip(s): too few to spare one (at most one in {MAX_HELD_SHARE} is "
                      "held out), so the loss is measured on training clips; it keeps falling as the LoRA "
                      "memorises them. Pick the checkpoint by eye from the samples, or add clips or a "
                      "dataset with role: validation")
    rest = [c for c in order if c not in held]
    scored_train = sorted(rest[:len(held) if held else want])
    if not scored_train and held:
        reason += "; no training clip is left to score beside them"
    return {
        "basis": basis,
        "reason": reason,
        "held_out_clips": held,
        "validation_samples": [_scored_sample(by_clip[c]) for c in held],
        "training_samples": [_scored_sample(by_clip[c]) for c in scored_train],
    }


def run_stage(params: Params, samples_manifest: Path, captions_manifest: Path, out: Path) -> dict:
    """DVC stage `split`: write the split file `out` from the samples and captions manifests."""
    samples = read_jsonl(samples_manifest)
    captioned = {r["id"] for r in read_jsonl(captions_manifest)}
    record = choose_split(samples, captioned, params)
    atomic_write_json(out, record)
    return record


def read_split(path: Path) -> Split:
    """The split the train and evaluate stages share; missing is an error naming the stage."""
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing, so the held-out clips are unknown. Fix: run the split stage "
                         "(`dvc repro split`)")
    r = json.loads(path.read_text(encoding="utf-8"))
    return Split(r["basis"], r["reason"], tuple(r["held_out_clips"]), tuple(r["validation_samples"]),
                 tuple(r["training_samples"]))
