"""Held out means held out: no batch reaches a held-out clip, and `best` sees overfitting (issue 24).

On the tiny model: a trainer run records every batch's sample ids; an overfitting run on a few
clips shows the training-clip loss falling while the held-out loss turns up, and `best` lands
before the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from _train_helpers import make_workspace, tiny_params, write_latents
from wanlora.config import DEFAULT_TARGETS
from wanlora.data import split
from wanlora.io import read_jsonl, write_jsonl
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
    record = split.run_stage(params, ws)
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
    assert sorted(tr.data.held_out) == sorted(held)
    with safe_open(str(ws / "data/lora/high/step_000030.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["wanlora.held_out_clips"]) == sorted(held)
    # another split is another run: its resumable state is not reused
    key = loop.run_key(params, ws)
    split.run_stage(tiny_params(root, sample={"validation_clips": 0}), ws)
    assert loop.run_key(params, ws) != key


@pytest.mark.slow
def test_overfitting_shows_and_best_is_not_the_last_step(tmp_path):
    """Five training clips, one held out; constant latents per clip (patch [1, 1, 1] lets the tiny
    model carry every value) and a high learning rate, so the LoRA memorises its clips: the loss on
    training clips keeps falling, the held-out loss falls first (denoising in general) and then
    rises (the captions now recall training clips), and best sits at the turn."""
    from wanlora.evaluate import run_stage as evaluate

    root = tmp_path / "model"
    ws = make_workspace(tmp_path / "ws", root, n_clips=6, patch=[1, 1, 1], scale=1.0, smooth=True)
    params = tiny_params(root, train={"steps": 300, "lr": 2e-2, "max_grad_norm": 0},
                         network={"rank": 16, "alpha": 16, "target_modules": [*DEFAULT_TARGETS, "proj_out"]},
                         save={"every": 30, "keep_last": 100}, multistage={"switch_every": 1},
                         sample={"prompts": [], "baseline": False, "validation_clips": 1})
    split.run_stage(params, ws)
    loop.train(loop.setup(params, ws))
    evaluate(params, ws, ws / "data/eval")
    metrics = json.loads((ws / "data/eval/metrics.json").read_text())
    best = json.loads((ws / "data/eval/best.json").read_text())["experts"]
    steps = sorted(int(s) for s in metrics["steps"])
    assert steps == list(range(30, 301, 30))
    for e in ("high", "low"):
        held = [metrics["steps"][str(s)][f"held_out_{e}"] for s in steps]
        train = [metrics["steps"][str(s)][f"train_{e}"] for s in steps]
        low = held.index(min(held))
        assert train[-1] < train[low] < train[0], f"{e}: training-clip loss {train}"
        assert 0 < low < len(steps) - 1 and held[-1] > 1.2 * held[low], f"{e}: held-out loss {held}"
        assert best[e]["step"] < steps[-1] and best[e]["lowest_step"] == steps[low]
        assert best[e]["step"] <= steps[low]
