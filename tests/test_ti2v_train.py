"""The train stage on the tiny TI2V 5B: one transformer, per-token timesteps, I2V and T2V mixed."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from _helpers import ti2v_params, ti2v_workspace, tiny_params
from safetensors import safe_open

from wanlora.config import DEFAULT_TARGETS, ParamsError
from wanlora.train import loop


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ti2v_train")
    return ti2v_workspace(base / "ws", base / "model"), base / "model"


def test_tiny_ti2v_overfits_two_clips(tmp_path):
    """One transformer trains every timestep (its loss is logged as `loss_main`), with half the
    batches image-to-video: the loss falls by more than half in 200 steps (patch [1, 1, 1], 64
    wide, and a LoRA on proj_out, as the A14B overfit test, so the model can carry 48 channels);
    measured 2.06 -> 1.05 with the tiny model's own 32 width, which cannot."""
    ws = ti2v_workspace(tmp_path / "ws", tmp_path / "model", patch=[1, 1, 1])
    params = ti2v_params(tmp_path / "model", train={"steps": 200, "lr": 2e-2, "lr_scheduler": "cosine", "max_grad_norm": 0},
                     network={"rank": 16, "alpha": 16, "target_modules": [*DEFAULT_TARGETS, "proj_out"]},
                     save={"every": 1000})
    tr = loop.setup(params, ws)
    assert list(tr.experts) == ["main"] and tr.dists["main"].band == (0.0, 1000.0)
    loop.train(tr)
    losses = [r["loss_main"] for r in tr.history]
    assert len(losses) == 200 and not any("loss_high" in r or "loss_low" in r for r in tr.history)
    first, last = statistics.mean(losses[:15]), statistics.mean(losses[-15:])
    assert last < 0.5 * first, f"{first:.3f} -> {last:.3f}"
    assert sorted(p.name for p in (ws / "data/lora/main").iterdir()) == ["step_000200.safetensors"]
    assert not (ws / "data/lora/high").exists() and not (ws / "data/lora/low").exists()
    with safe_open(ws / "data/lora/main/step_000200.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["wanlora.expert"] == "main" and meta["wanlora.variant"] == "ti2v-5b"
    assert json.loads(meta["wanlora.timesteps"])["band_lo"] == 0.0


def test_batches_mix_image_to_video_by_i2v_share(template, tmp_path):
    """Each video sample trains image-to-video with probability datasets.<name>.i2v_share (null:
    0.5), drawn from the batch's own generator; 0 and 1 give all T2V or all I2V."""
    ws = shutil.copytree(template[0], tmp_path / "ws")
    for share, expect in ((None, 0.5), (0.0, 0.0), (1.0, 1.0)):
        params = ti2v_params(template[1], datasets={"main": {"i2v_share": share}})
        tr = loop.setup(params, ws)
        draws = [bool(loop.make_batch(tr, [0], "main", torch.Generator().manual_seed(s)).clean_first[0])
                 for s in range(400)]
        assert abs(sum(draws) / 400 - expect) < 0.07, (share, sum(draws))
        again = loop.make_batch(tr, [0], "main", torch.Generator().manual_seed(3))
        assert bool(again.clean_first[0]) == draws[3]


def test_multistage_settings_are_refused(template, tmp_path):
    """TI2V 5B is one transformer: a multistage setting is refused naming it and the fix."""
    for ms in ({"train_low_noise": False}, {"boundary_ratio": 0.9}, {"switch_every": 3}):
        params = tiny_params(template[1], multistage=ms)
        with pytest.raises(ParamsError, match=r"multistage\.\w+.*one transformer.*Fix: delete these keys"):
            loop.setup(params, template[0])


def test_i2v_share_is_refused_on_two_expert_models(tmp_path):
    """Only TI2V 5B takes a clean start frame by per-token timesteps; a share set for T2V A14B
    would be silently ignored, so it stops instead."""
    from _helpers import make_workspace

    ws = make_workspace(tmp_path / "ws", tmp_path / "model")
    params = tiny_params(tmp_path / "model", datasets={"main": {"i2v_share": 1.0}})
    with pytest.raises(ParamsError, match=r"datasets\.main\.i2v_share: 1\.0: only TI2V 5B.*Fix: set it to null"):
        loop.setup(params, ws)
