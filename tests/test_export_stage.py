"""The export stage: chosen step, both formats, lineage carried forward, errors that list steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict

from tests._eval_helpers import forward, make_lineage_workspace, random_lora, tiny_pipeline
from wanlora.config import DEFAULT_TARGETS, load_params, parse_params
from wanlora.export import lineage
from wanlora.export.stage import run_stage
from wanlora.export.audit import verify
from wanlora.export.formats import load_safetensors, read_header, read_native, save_safetensors
from wanlora.io import atomic_write_json

RANK, ALPHA = 4, 2.0  # alpha != rank: a wrong scale would show


def _trained_workspace(ws: Path, steps=(2, 4), n_clips: int = 2) -> tuple[Path, dict]:
    """Checkpoints as the trainer writes them: peft keys, lineage header (alpha only there)."""
    make_lineage_workspace(ws, n_clips)
    params = parse_params({"network": {"rank": RANK, "alpha": ALPHA}, "job": {"name": "cat"}})
    pipe = tiny_pipeline()
    loras = {}
    for step in steps:
        for expert, model in (("high", pipe.transformer), ("low", pipe.transformer_2)):
            lora = random_lora(model, seed=step * 10 + len(expert), rank=RANK, alpha=ALPHA,
                               targets=list(DEFAULT_TARGETS))
            loras[step, expert] = lora
            sd = {}
            for module, m in lora.items():
                sd[f"transformer.{module}.lora_A.weight"] = m.down
                sd[f"transformer.{module}.lora_B.weight"] = m.up
            meta = lineage.lineage_metadata(params, ws, step, expert, "tiny")
            save_safetensors(ws / f"data/lora/{expert}/step_{step:06d}.safetensors", sd, meta)
    return ws, {"params": params, "loras": loras}


def _peft_adapted(model, lora):
    """Our training-time model: the base with a peft adapter holding these weights."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)), adapter_name="ours")
    sd = {}
    for module, m in lora.items():
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = m.down, m.up
    set_peft_model_state_dict(model, sd, adapter_name="ours")
    return model


def test_export_best_step_for_comfyui_and_diffusers(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path)
    atomic_write_json(ws / "data/eval/metrics.json", {"best_step": 2, "steps": {}})
    out = ws / "data/exports"
    run_stage(made["params"], ws, out)

    summary = json.loads((out / "export.json").read_text())
    assert summary["step"] == 2 and summary["chosen_by"] == "best"
    assert sorted(f["path"] for f in summary["files"]) == [
        "comfyui/cat_step000002_high_noise.safetensors", "comfyui/cat_step000002_low_noise.safetensors",
        "diffusers/cat_step000002_high_noise.safetensors", "diffusers/cat_step000002_low_noise.safetensors"]

    # diffusers files into the pipeline (low into transformer_2) == our peft-adapted experts
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(out / "diffusers/cat_step000002_high_noise.safetensors"), adapter_name="h")
    pipe.load_lora_weights(str(out / "diffusers/cat_step000002_low_noise.safetensors"), adapter_name="l",
                           load_into_transformer_2=True)
    ref = tiny_pipeline()
    want_high = forward(_peft_adapted(ref.transformer, made["loras"][2, "high"]))
    want_low = forward(_peft_adapted(ref.transformer_2, made["loras"][2, "low"]))
    assert (want_high - forward(tiny_pipeline().transformer)).abs().max() > 1e-2
    torch.testing.assert_close(forward(pipe.transformer), want_high, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(forward(pipe.transformer_2), want_low, atol=2e-4, rtol=1e-3)

    # ComfyUI file: same tensors under native names, alpha carried as a scalar
    _, cmeta = read_header(out / "comfyui/cat_step000002_low_noise.safetensors")
    comfy, _ = load_safetensors(out / "comfyui/cat_step000002_low_noise.safetensors")
    back = read_native(comfy)
    assert torch.equal(back["blocks.1.ffn.net.2"].up, made["loras"][2, "low"]["blocks.1.ffn.net.2"].up)
    assert comfy["diffusion_model.blocks.1.ffn.2.alpha"].item() == ALPHA
    assert cmeta["wanlora.format"] == "comfyui" and cmeta["wanlora.expert"] == "low" and cmeta["wanlora.step"] == "2"
    assert cmeta["wanlora.exported_from"] == "step_000002.safetensors"

    # the audit works on an exported file
    result = verify(out / "comfyui/cat_step000002_high_noise.safetensors", ws)
    assert result.ok and result.all_unchanged and len(result.samples) == 4


def test_last_and_numbered_steps(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2, 4, 6))
    params = made["params"]
    params.export.step, params.export.formats = "last", ["diffusers"]
    run_stage(params, ws, ws / "out")
    assert json.loads((ws / "out/export.json").read_text())["step"] == 6
    assert not (ws / "out/comfyui").exists()
    params.export.step = "4"
    run_stage(params, ws, ws / "out4")
    assert (ws / "out4/diffusers/cat_step000004_low_noise.safetensors").is_file()


def test_missing_step_lists_available_steps(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2, 4))
    made["params"].export.step = "3"
    with pytest.raises(ValueError, match="no checkpoint for step 3; available steps: 2, 4"):
        run_stage(made["params"], ws, ws / "out")
    made["params"].export.step = "best"
    with pytest.raises(FileNotFoundError, match="metrics.json: missing.*one of: 2, 4"):
        run_stage(made["params"], ws, ws / "out")


def test_no_checkpoints_says_run_train(tmp_path: Path):
    make_lineage_workspace(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoints in data/lora/.*run the train stage"):
        run_stage(load_params(tmp_path / "params.yaml"), tmp_path, tmp_path / "out")


def test_lineage_sidecar_travels_with_exports(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2,), n_clips=400)
    made["params"].export.step = "2"
    run_stage(made["params"], ws, ws / "out")
    exported = ws / "out/diffusers/cat_step000002_high_noise.safetensors"
    assert len(list((ws / "out/diffusers").glob("lineage-*.json"))) == 1
    assert verify(exported, ws).ok
