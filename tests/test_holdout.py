"""Held out means held out: no batch reaches a held-out clip, and `best` sees overfitting (issue 24).

On the tiny model: a trainer run records every batch's sample ids; an overfitting run on a few
clips shows the training-clip loss falling while the held-out loss turns up, and `best` lands
before the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from _helpers import make_workspace, tiny_params, write_latents
from wanlora.config import DEFAULT_TARGETS
from wanlora.data import split
from wanlora.io import read_jsonl, write_jsonl
from wanlora.pipeline import CAPTION_MANIFEST, SAMPLES, SPLIT_FILE
from wanlora.stages.evaluate import inputs
from wanlora.train import loop


def _windows(ws: Path, root: Path, windows: int) -> None:
    """Give every clip `windows` windows and a flipped copy of each, with latents, as the bucket
    stage does with windows_per_clip and flip_horizontal: a held-out clip is all of them."""
    rows = []
    for rec in read_jsonl(ws / "data/buckets/samples.jsonl"):
        for k in range(windows):
            for flip in (False, True):
                rows.append({**rec, "id": f"{rec['clip_id']}#{k}{'f' if flip else ''}", "flip": flip})
    write_jsonl(ws / "data/buckets/samples.jsonl", sorted(rows, key=lambda r: r["id"]))
    write_latents(ws, root)


def test_held_out_clips_never_reach_a_training_step(tmp_path, monkeypatch):
    root = tmp_path / "model"
    ws = make_workspace(tmp_path / "ws", root, n_clips=6)
    _windows(ws, root, windows=2)
    params = tiny_params(root, train={"steps": 30, "batch_size": 2}, sample={"validation_clips": 1},
                         save={"every": 30})
    record = split.run_stage(params, ws / SAMPLES, ws / CAPTION_MANIFEST, ws / SPLIT_FILE)
    held = set(record["held_out_clips"])
    assert len(held) == 1 and record["basis"] == "held_out"
    held_samples = {r["id"] for r in read_jsonl(ws / "data/buckets/samples.jsonl") if r["clip_id"] in held}
    assert len(held_samples) == 4  # two windows and their flipped copies

    batches: list[list[str]] = []
    loaded: list[str] = []
    real_batch, real_latent = loop.make_batch, loop.TrainData.latent
    monkeypatch.setattr(loop, "make_batch", lambda tr, idx, e, g: batches.append(
        [tr.data.items[i].id for i in idx]) or real_batch(tr, idx, e, g))
    monkeypatch.setattr(loop.TrainData, "latent", lambda self, i, g: loaded.append(self.items[i].id)
                        or real_latent(self, i, g))
    tr = loop.setup(params, ws)
    loop.train(tr)

    assert len(batches) == 30  # every optimizer step's batch was seen (accumulation 1)
    seen = {sid for b in batches for sid in b}
    assert not seen & held_samples, f"held-out samples trained: {sorted(seen & held_samples)}"
    assert not set(loaded) & held_samples  # not even a latent of them was read
    trainable = {r["id"] for r in read_jsonl(ws / "data/buckets/samples.jsonl")} - held_samples
    assert seen == trainable  # 20 samples in 30 batches of 2: all of them trained
    assert sorted(tr.data.held_out) == sorted(held_samples)
    with safe_open(str(ws / "data/lora/high/step_000030.safetensors"), framework="pt") as f:
        rows = {r["id"]: r for r in json.loads(f.metadata()["wanlora.samples"])}
    assert {i for i, r in rows.items() if not r["trained"]} == held_samples  # the lineage says which and why
    assert {rows[i]["reason"] for i in held_samples} == {split.HELD_OUT_REASON}
    # another split is another run: its resumable state is not reused
    key = loop.run_key(params, ws, tr.base_identity)
    split.run_stage(tiny_params(root, sample={"validation_clips": 0}), ws / SAMPLES, ws / CAPTION_MANIFEST, ws / SPLIT_FILE)
    assert loop.run_key(params, ws, tr.base_identity) != key


@pytest.mark.slow
def test_overfitting_shows_and_best_is_not_the_last_step(tmp_path):
    """Six clips, one held out, 160 steps. Each clip's latent is one vector per channel (patch
    [1, 1, 1] lets the tiny model carry every value); the five training clips share a look
    (0.7 c + 0.3 own) that the held-out clip lacks (-0.7 c + 0.3 own). The low-noise LoRA first
    learns to denoise such latents at all, which helps every clip, then pulls every output toward
    the training look: its training-clip loss keeps falling while the held-out loss turns up, and
    best sits at the turn. Measured: held-out 1.45 at the base, 1.30 at step 20, 1.69 at step 160;
    training clips 1.65, 0.94, 0.75. The high-noise expert, where the noise hides the look, keeps
    improving on the held-out clip over these steps; its best is still its lowest held-out loss."""
    from wanlora.evaluate.stage import run_stage as evaluate

    root = tmp_path / "model"
    ws = make_workspace(tmp_path / "ws", root, n_clips=6, patch=[1, 1, 1], scale=1.0, smooth=True)
    params = tiny_params(root, train={"steps": 160, "lr": 2e-2, "lr_scheduler": "cosine", "max_grad_norm": 0},
                         network={"rank": 16, "alpha": 16, "target_modules": [*DEFAULT_TARGETS, "proj_out"]},
                         save={"every": 20, "keep_last": 100}, multistage={"switch_every": 1},
                         sample={"prompts": [], "validation_clips": 1, "validation_timesteps": [100, 500, 900, 950]})
    held = set(split.run_stage(params, ws / SAMPLES, ws / CAPTION_MANIFEST, ws / SPLIT_FILE)["held_out_clips"])
    look: list[torch.Tensor] = []

    def mean_of(rec: dict, g: torch.Generator) -> torch.Tensor:
        if not look:
            look.append(torch.randn(16, 1, 1, 1, generator=g))
        return (-0.7 if rec["clip_id"] in held else 0.7) * look[0] + 0.3 * torch.randn(16, 1, 1, 1, generator=g)

    write_latents(ws, root, mean_of=mean_of)
    loop.train(loop.setup(params, ws))
    evaluate(params, ws, inputs(ws), ws / "data/eval")

    rows = json.loads((ws / "data/eval/val_loss.json").read_text())  # step 0: the base model
    best = json.loads((ws / "data/eval/best.json").read_text())["experts"]
    steps = [r["step"] for r in rows[1:]]
    assert [r["step"] for r in rows] == [0, *range(20, 161, 20)]
    for e in ("high", "low"):
        held_loss = [r[f"held_out_{e}"] for r in rows]
        lowest = min(range(1, len(rows)), key=lambda i: held_loss[i])
        assert best[e]["lowest_step"] == steps[lowest - 1] and best[e]["step"] <= best[e]["lowest_step"]
    held_loss, train_loss = [r["held_out_low"] for r in rows], [r["train_low"] for r in rows]
    turn = held_loss.index(min(held_loss))
    assert 0 < turn < len(rows) - 1 and held_loss[-1] > 1.15 * held_loss[turn], f"held-out: {held_loss}"
    assert train_loss[-1] == min(train_loss) and train_loss[-1] < 0.9 * train_loss[turn] < train_loss[0], \
        f"training clips: {train_loss}"
    assert best["low"]["step"] < steps[-1]
