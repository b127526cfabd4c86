"""`wanlora audit`: lineage read from the header and compared with the workspace."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from typer.testing import CliRunner

from tests._eval_helpers import make_lineage_workspace
from wanlora.cli import app
from wanlora.config import load_params
from wanlora.export import lineage
from wanlora.export.audit import audit, verify
from wanlora.export.formats import save_safetensors

LORA = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 4),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(4, 2)}


def _lora_file(ws: Path, n_clips: int = 2, **kw) -> Path:
    make_lineage_workspace(ws, n_clips)
    meta = lineage.lineage_metadata(load_params(ws / "params.yaml"), ws, 100, "high", "tiny", **kw)
    path = ws / "data/lora/high/step_000100.safetensors"
    save_safetensors(path, LORA, meta)
    return path


def test_audit_of_an_untouched_workspace(tmp_path: Path):
    path = _lora_file(tmp_path)
    console = Console(record=True, width=200)
    result = audit(path, tmp_path, console)
    assert result.ok and result.all_unchanged
    assert [(s.id, s.source, s.caption) for s in result.samples] == [
        ("main/c0.mp4#0", "unchanged", "unchanged"), ("main/c0.mp4#1", "unchanged", "unchanged"),
        ("main/c1.mp4#0", "unchanged", "unchanged"), ("main/c1.mp4#1", "unchanged", "unchanged")]
    assert {m.name: m.status for m in result.manifests} == {"captions": "unchanged", "clips": "unchanged",
                                                             "samples": "unchanged"}
    text = console.export_text()
    assert "expert high, step 100, base tiny" in text and "data/raw/c0.txt" in text
    assert "4 sample(s); all sources and captions match the workspace" in text


def test_audit_detects_a_changed_caption_and_a_missing_clip(tmp_path: Path):
    path = _lora_file(tmp_path, n_clips=3)
    (tmp_path / "data/raw/c0.txt").write_text("sks clip number 0, edited")
    (tmp_path / "data/raw/c1.mp4").unlink()
    (tmp_path / "data/captions/captions.jsonl").write_text("")
    result = verify(path, tmp_path)
    assert result.ok and not result.all_unchanged
    by_id = {s.id: s for s in result.samples}
    assert (by_id["main/c0.mp4#0"].source, by_id["main/c0.mp4#0"].caption) == ("unchanged", "changed")
    assert (by_id["main/c1.mp4#1"].source, by_id["main/c1.mp4#1"].caption) == ("missing", "unchanged")
    assert (by_id["main/c2.mp4#0"].source, by_id["main/c2.mp4#0"].caption_source) == ("unchanged", "default")
    assert by_id["main/c2.mp4#0"].caption == "unchanged"
    assert {m.name: m.status for m in result.manifests}["captions"] == "changed"
    assert result.message == "4 of 6 sample(s) differ from the workspace"


def test_changed_default_caption_is_detected(tmp_path: Path):
    path = _lora_file(tmp_path)
    p = tmp_path / "params.yaml"
    p.write_text(p.read_text().replace("default_caption: a clip", "default_caption: another clip"))
    assert [s.caption for s in verify(path, tmp_path).samples][2:] == ["changed", "changed"]


def test_audit_of_a_file_without_lineage_fails_clearly(tmp_path: Path):
    path = tmp_path / "someone_elses.safetensors"
    save_safetensors(path, LORA, {"ss_network_module": "networks.lora"})
    result = verify(path, tmp_path)
    assert not result.ok
    assert "carries no wanlora lineage" in result.message and "cannot be verified" in result.message
    run = CliRunner().invoke(app, ["audit", str(path), "--workspace", str(tmp_path)])
    assert run.exit_code == 2 and "no wanlora lineage" in run.output


def test_missing_or_altered_sidecar_makes_lineage_unverifiable(tmp_path: Path):
    path = _lora_file(tmp_path, n_clips=400)
    sidecar = next((tmp_path / "data/lora/high").glob("lineage-*.json"))
    assert verify(path, tmp_path).ok
    sidecar.write_text(sidecar.read_text().replace("c1.mp4", "cX.mp4"))
    result = verify(path, tmp_path)
    assert not result.ok and "does not match the hash in the header" in result.message
    sidecar.unlink()
    result = verify(path, tmp_path)
    assert not result.ok and f"sidecar {sidecar.name} is missing" in result.message
    run = CliRunner().invoke(app, ["audit", str(path), "--workspace", str(tmp_path)])
    assert run.exit_code == 2  # lineage cannot be verified (1 is for changed data)


def test_pickle_file_is_not_opened(tmp_path: Path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even opened")
    result = verify(path, tmp_path)
    assert not result.ok and "refused" in result.message
