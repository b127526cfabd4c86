"""The export stage: chosen step, both formats, lineage carried forward, errors that list steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict

from _helpers import (LINEAGE_PARAMS, forward, make_lineage_workspace, random_lora, save_checkpoint,
                                 tiny_pipeline)
from wanlora.config import DEFAULT_TARGETS, ParamsError, load_params, parse_params
from wanlora.export.stage import run_stage
from wanlora.export.audit import verify
from wanlora.export.formats import LoraFormatError, read_native
from wanlora.tensorfiles import load as load_safetensors, read_header, save as save_safetensors
from wanlora.io import atomic_write_json
from wanlora.pipeline import BEST, LORA

RANK, ALPHA = 4, 2.0  # alpha != rank: a wrong scale would show


def _trained_workspace(ws: Path, steps=(2, 4), n_clips: int = 2, params: dict | None = None) -> tuple[Path, dict]:
    """Checkpoints as the trainer writes them: peft keys, lineage header (alpha only there)."""
    raw = {**LINEAGE_PARAMS, "network": {"rank": RANK, "alpha": ALPHA}, "job": {"name": "cat"}, **(params or {})}
    make_lineage_workspace(ws, n_clips, params=raw)
    params = parse_params(raw)
    pipe = tiny_pipeline()
    loras = {}
    for step in steps:
        for expert, model in (("high", pipe.transformer), ("low", pipe.transformer_2)):
            lora = random_lora(model, seed=step * 10 + len(expert), rank=RANK, alpha=ALPHA,
                               targets=list(DEFAULT_TARGETS))
            loras[step, expert] = lora
            save_checkpoint(ws, lora, step, expert, params)
    return ws, {"params": params, "loras": loras}


def _peft_adapted(model, lora):
    """Our training-time model: the base with a peft adapter holding these weights."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)), adapter_name="ours")
    sd = {}
    for module, m in lora.items():
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = m.down, m.up
    set_peft_model_state_dict(model, sd, adapter_name="ours")
    return model


def _best(ws: Path, high: int, low: int, basis: str = "held_out") -> None:
    """best.json as the evaluate stage writes it (`wanlora.evaluate.stage.choose_experts`)."""
    experts = {e: {"step": s, "loss": 0.5, "lowest_step": s, "lowest_loss": 0.5, "noise": 0.01,
                   "reason": f"step {s}: lowest held-out loss"} for e, s in (("high", high), ("low", low))}
    atomic_write_json(ws / "data/eval/best.json", {"basis": basis, "experts": experts})


def test_export_best_step_for_comfyui_and_diffusers(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path)
    _best(ws, 2, 2)
    out = ws / "data/exports"
    run_stage(made["params"], ws / LORA, ws / BEST, out)

    summary = json.loads((out / "export.json").read_text())
    assert summary["chosen_by"] == "best" and {e: p["step"] for e, p in summary["experts"].items()} == {
        "high": 2, "low": 2}
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

    assert cmeta["wanlora.exported_name"] == "cat_step000002_low_noise.safetensors"

    # the audit works on an exported file: its tensors hash like the checkpoint's in both formats
    for fmt in ("comfyui", "diffusers"):
        result = verify(out / f"{fmt}/cat_step000002_high_noise.safetensors", ws)
        assert result.ok and result.all_unchanged and len(result.samples) == 4, result.message


def test_last_and_numbered_steps(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2, 4, 6))
    params = made["params"]
    params.export.step, params.export.formats = "last", ["diffusers"]
    run_stage(params, ws / LORA, ws / BEST, ws / "out")
    assert {e: p["step"] for e, p in json.loads((ws / "out/export.json").read_text())["experts"].items()} == {
        "high": 6, "low": 6}
    assert not (ws / "out/comfyui").exists()
    params.export.step = "4"
    run_stage(params, ws / LORA, ws / BEST, ws / "out4")
    assert (ws / "out4/diffusers/cat_step000004_low_noise.safetensors").is_file()


def test_missing_step_lists_available_steps(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2, 4))
    made["params"].export.step = "3"
    with pytest.raises(ValueError, match="no checkpoint for step 3; available steps: 2, 4"):
        run_stage(made["params"], ws / LORA, ws / BEST, ws / "out")
    made["params"].export.step = "best"
    with pytest.raises(FileNotFoundError, match="best.json: missing.*one of: 2, 4"):
        run_stage(made["params"], ws / LORA, ws / BEST, ws / "out")
    atomic_write_json(ws / "data/eval/best.json", {"basis": "none", "experts": {}})
    with pytest.raises(ValueError, match="no fixed-noise loss for the high-noise expert.*one of: 2, 4"):
        run_stage(made["params"], ws / LORA, ws / BEST, ws / "out")


def test_best_exports_each_expert_from_its_own_step_and_says_why(tmp_path: Path):
    """The high- and low-noise LoRAs may stop improving at different steps (issue 24): each file
    comes from its expert's best step, and its header and export.json say which and why."""
    ws, made = _trained_workspace(tmp_path, steps=(2, 4, 6))
    _best(ws, 4, 2)
    run_stage(made["params"], ws / LORA, ws / BEST, ws / "out")
    names = sorted(p.name for p in (ws / "out/diffusers").glob("*.safetensors"))
    assert names == ["cat_step000002_low_noise.safetensors", "cat_step000004_high_noise.safetensors"]
    for expert, step in (("high", 4), ("low", 2)):
        path = ws / f"out/comfyui/cat_step{step:06d}_{expert}_noise.safetensors"
        _, meta = read_header(path)
        assert meta["wanlora.step"] == str(step) and meta["wanlora.exported_from"] == f"step_{step:06d}.safetensors"
        assert json.loads(meta["wanlora.export_choice"]) == {
            "step": step, "by": "best", "basis": "held_out", "reason": f"step {step}: lowest held-out loss"}
        back = read_native(load_safetensors(path)[0])
        assert torch.equal(back["blocks.0.attn1.to_q"].down, made["loras"][step, expert]["blocks.0.attn1.to_q"].down)
    summary = json.loads((ws / "out/export.json").read_text())
    assert summary["experts"]["high"] == {"step": 4, "by": "best", "basis": "held_out",
                                          "reason": "step 4: lowest held-out loss"}
    assert {(f["expert"], f["step"]) for f in summary["files"]} == {("high", 4), ("low", 2)}


def test_no_checkpoints_says_run_train(tmp_path: Path):
    make_lineage_workspace(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoints in data/lora/.*run the train stage"):
        run_stage(load_params(tmp_path / "params.yaml"), tmp_path / LORA, tmp_path / BEST, tmp_path / "out")


def test_lineage_sidecar_travels_with_exports(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2,), n_clips=400)
    made["params"].export.step = "2"
    run_stage(made["params"], ws / LORA, ws / BEST, ws / "out")
    exported = ws / "out/diffusers/cat_step000002_high_noise.safetensors"
    assert len(list((ws / "out/diffusers").glob("lineage-*.json"))) == 1
    assert verify(exported, ws).ok


def test_export_headers_carry_no_absolute_path(tmp_path: Path):
    """Issue 22: exports carried the full resolved params with absolute paths (user names, cache
    and output dirs), the prompts and the default caption. They keep the train stage's params,
    with paths relative to the workspace, and what export decided in keys of its own."""
    outside = tmp_path / "home" / "alice" / "models" / "Wan2.2-T2V-A14B-Diffusers"
    ws, made = _trained_workspace(tmp_path / "ws", steps=(2,), params={
        "model": {"name_or_path": str(outside)},
        "quantization": {"cache_dir": str(tmp_path / "home/alice/.cache/wanlora")},
        "sample": {"prompts": ["a private prompt"]}})
    made["params"].export.step = "2"
    run_stage(made["params"], ws / LORA, ws / BEST, ws / "data/exports")
    for path in sorted((ws / "data/exports").rglob("*.safetensors")):
        _, meta = read_header(path)
        text = json.dumps(meta)
        assert str(tmp_path) not in text and "alice" not in text and "a private prompt" not in text
        assert meta["wanlora.base_model"] == "external:Wan2.2-T2V-A14B-Diffusers@main#tiny"
        recorded = json.loads(meta["wanlora.params"])
        assert recorded["model.name_or_path"] == "external:Wan2.2-T2V-A14B-Diffusers"
        assert not any(isinstance(v, str) and v.startswith(("/", "~")) for v in recorded.values())
        assert "job.name" not in recorded and meta["wanlora.exported_name"] == path.name
        assert verify(path, ws).all_unchanged


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/abs", "sub/dir", ".."])
def test_a_job_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str):
    """Issue 22: `job.name: ../../../x` made export write outside the workspace."""
    (tmp_path / "params.yaml").write_text(f"job:\n  name: '{name}'\n")
    with pytest.raises(ParamsError, match="job.name: must be a plain file name"):
        load_params(tmp_path / "params.yaml")
    ws, made = _trained_workspace(tmp_path / "ws", steps=(2,))
    with pytest.raises(ValueError, match="plain file name"):
        made["params"].job.name = name  # params are validated on assignment too
    assert parse_params({"job": {"name": "my character v1"}}).job.name == "my character v1"


def test_export_refuses_a_checkpoint_whose_tensors_do_not_match_its_header(tmp_path: Path):
    ws, made = _trained_workspace(tmp_path, steps=(2,))
    path = ws / "data/lora/high/step_000002.safetensors"
    sd, meta = load_safetensors(path)
    sd = {k: v + 1 for k, v in sd.items()}
    save_safetensors(path, sd, meta)
    made["params"].export.step = "2"
    with pytest.raises(LoraFormatError, match="do not match the hash its header recorded"):
        run_stage(made["params"], ws / LORA, ws / BEST, ws / "out")
