"""`wanlora audit`: lineage read from the file and compared with the workspace.

Issue 22's experiments, one test each: audit passed an empty sample list, a tampered manifest,
changed params and random tensors under a copied header; a forged header made it hash
/etc/hostname and read ../../../../etc/passwd; a 100 MB header took 2.7 GB; deep JSON crashed it.
Issue 23 / 25: a clip training skipped was listed as a matching sample.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from _helpers import make_lineage_workspace, save_checkpoint
from wanlora.cli import app
from wanlora.export import audit as audit_mod
from wanlora.export.audit import audit, verify
from wanlora.export.formats import LoraModule
from wanlora.tensorfiles import load as load_safetensors, save as save_safetensors
from wanlora.io import read_jsonl, sha256_file, write_jsonl

LORA = {"blocks.0.attn1.to_q": LoraModule(torch.arange(8.0).reshape(2, 4), torch.ones(4, 2), 2.0)}
OTHER = {"blocks.0.attn1.to_q": LoraModule(torch.arange(8.0).reshape(2, 4) + 1, torch.ones(4, 2), 2.0)}


def _lora_file(ws: Path, n_clips: int = 2, uncaptioned: int = 0, **kw) -> Path:
    make_lineage_workspace(ws, n_clips, uncaptioned)
    return save_checkpoint(ws, LORA, 100, "high", **kw)


def _exit(path: Path, ws: Path) -> tuple[int, str]:
    run = CliRunner().invoke(app, ["audit", str(path), "--workspace", str(ws)])
    return run.exit_code, run.output


def _rewrite_header(path: Path, dst: Path, **changes: str | None) -> Path:
    """The same tensors under a header with `changes` (None deletes the key): a forgery."""
    sd, meta = load_safetensors(path)
    for k, v in changes.items():
        meta.pop("wanlora." + k, None) if v is None else meta.__setitem__("wanlora." + k, v)
    save_safetensors(dst, sd, meta)
    return dst


def test_audit_of_an_untouched_workspace(tmp_path: Path):
    path = _lora_file(tmp_path)
    console = Console(record=True, width=200)
    result = audit(path, tmp_path, console)
    assert result.ok and result.all_unchanged
    assert [(s.id, s.source, s.caption) for s in result.samples] == [
        ("main/c0.mp4#0", "unchanged", "unchanged"), ("main/c0.mp4#1", "unchanged", "unchanged"),
        ("main/c1.mp4#0", "unchanged", "unchanged"), ("main/c1.mp4#1", "unchanged", "unchanged")]
    assert {m.name: m.status for m in result.manifests} == {"captions": "unchanged", "samples": "unchanged"}
    assert result.checkpoint.status == "unchanged" and result.params == []
    text = console.export_text()
    assert "expert high, step 100, base Wan-AI/Wan2.2-T2V-A14B-Diffusers@main#tiny" in text
    assert "data/raw/c0.txt" in text
    assert "4 trained sample(s); all sources, captions, manifests, params and the checkpoint match" in text
    assert _exit(path, tmp_path)[0] == 0


def test_audit_detects_a_changed_caption_and_a_missing_clip(tmp_path: Path):
    path = _lora_file(tmp_path, n_clips=3)
    (tmp_path / "data/raw/c0.txt").write_text("sks clip number 0, edited")
    (tmp_path / "data/raw/c1.mp4").unlink()
    result = verify(path, tmp_path)
    assert result.ok and not result.all_unchanged
    by_id = {s.id: s for s in result.samples}
    assert (by_id["main/c0.mp4#0"].source, by_id["main/c0.mp4#0"].caption) == ("unchanged", "changed")
    assert (by_id["main/c1.mp4#1"].source, by_id["main/c1.mp4#1"].caption) == ("missing", "unchanged")
    assert (by_id["main/c2.mp4#0"].source, by_id["main/c2.mp4#0"].caption_source) == ("unchanged", "default")
    assert by_id["main/c2.mp4#0"].caption == "unchanged"
    assert result.message == "6 trained sample(s); 4 of 6 trained sample(s) differ from the workspace"
    assert _exit(path, tmp_path)[0] == 1


def test_changed_default_caption_is_detected(tmp_path: Path):
    path = _lora_file(tmp_path)
    p = tmp_path / "params.yaml"
    p.write_text(p.read_text().replace("default_caption: a clip", "default_caption: another clip"))
    assert [s.caption for s in verify(path, tmp_path).samples][2:] == ["changed", "changed"]


def test_a_skipped_clip_is_listed_as_not_trained(tmp_path: Path):
    """Issue 23 / 25 item 10: a clip without a caption was listed as a matching sample, and
    editing it made audit report a trained sample as changed."""
    path = _lora_file(tmp_path, uncaptioned=1)
    console = Console(record=True, width=200)
    result = audit(path, tmp_path, console)
    by_id = {s.id: s for s in result.samples}
    assert (by_id["main/u0.mp4#0"].source, by_id["main/u0.mp4#0"].note) == ("not trained", "no caption for its clip")
    assert not by_id["main/u0.mp4#0"].trained and by_id["main/c0.mp4#0"].trained
    assert result.all_unchanged and result.message.startswith("4 trained sample(s), 2 not trained; all ")
    assert "not trained" in console.export_text()
    # the skipped clip changes (it is re-encoded and re-bucketed): no trained sample is "changed",
    # but the samples manifest training read is no longer the same, so the workspace differs
    (tmp_path / "data/raw/u0.mp4").write_bytes(b"re-encoded")
    rows = read_jsonl(tmp_path / "data/buckets/samples.jsonl")
    for r in rows:
        if r["clip_id"] == "main/u0.mp4":
            r["sha256"] = sha256_file(tmp_path / "data/raw/u0.mp4")
    write_jsonl(tmp_path / "data/buckets/samples.jsonl", rows)
    result = verify(path, tmp_path)
    assert all(s.source in ("unchanged", "not trained") for s in result.samples)
    assert result.message == ("4 trained sample(s), 2 not trained; manifest data/buckets/samples.jsonl is changed")
    assert _exit(path, tmp_path)[0] == 1


def test_audit_of_a_file_without_lineage_fails_clearly(tmp_path: Path):
    path = tmp_path / "someone_elses.safetensors"
    save_safetensors(path, {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 4)},
                     {"ss_network_module": "networks.lora"})
    result = verify(path, tmp_path)
    assert not result.ok
    assert "carries no wanlora lineage" in result.message and "cannot be verified" in result.message
    code, out = _exit(path, tmp_path)
    assert code == 2 and "no wanlora lineage" in out


def test_missing_or_altered_sidecar_makes_lineage_unverifiable(tmp_path: Path):
    path = _lora_file(tmp_path, n_clips=400)
    sidecar = next((tmp_path / "data/lora/high").glob("lineage-*.json"))
    assert verify(path, tmp_path).all_unchanged
    sidecar.write_text(sidecar.read_text().replace("c1.mp4", "cX.mp4"))
    result = verify(path, tmp_path)
    assert not result.ok and "does not match the hash in the header" in result.message
    sidecar.unlink()
    result = verify(path, tmp_path)
    assert not result.ok and f"sidecar {sidecar.name} is missing" in result.message
    assert _exit(path, tmp_path)[0] == 2  # lineage cannot be verified (1 is for changed data)


def test_pickle_file_is_not_opened(tmp_path: Path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even opened")
    result = verify(path, tmp_path)
    assert not result.ok and "refused" in result.message


# ------------------------------------------------------------------ issue 22: forged lineage
@pytest.mark.parametrize("samples", ["[]", None])
def test_an_empty_or_missing_sample_list_cannot_pass(tmp_path: Path, samples):
    """A header whose sample list is "[]" passed with exit 0: an empty list was "all unchanged"."""
    forged = _rewrite_header(_lora_file(tmp_path), tmp_path / "forged.safetensors", samples=samples)
    result = verify(forged, tmp_path)
    assert not result.ok and "lists no" in result.message
    assert _exit(forged, tmp_path)[0] == 2


def test_a_row_added_to_the_samples_manifest_fails(tmp_path: Path):
    """A row added to data/buckets/samples.jsonl showed as "changed" but audit still exited 0."""
    path = _lora_file(tmp_path)
    rows = read_jsonl(tmp_path / "data/buckets/samples.jsonl")
    write_jsonl(tmp_path / "data/buckets/samples.jsonl", [*rows, {**rows[0], "id": "main/c0.mp4#9"}])
    result = verify(path, tmp_path)
    assert result.ok and not result.all_unchanged
    assert [(s.id, s.source) for s in result.samples if s.source == "new"] == [("main/c0.mp4#9", "new")]
    assert "1 sample(s) in the workspace are not in the lineage" in result.message
    assert "manifest data/buckets/samples.jsonl is changed" in result.message
    assert _exit(path, tmp_path)[0] == 1


def test_a_sample_gone_from_the_manifest_or_a_missing_manifest_fails(tmp_path: Path):
    path = _lora_file(tmp_path)
    manifest = tmp_path / "data/buckets/samples.jsonl"
    write_jsonl(manifest, read_jsonl(manifest)[1:])
    result = verify(path, tmp_path)
    assert [s.id for s in result.samples if s.source == "gone"] == ["main/c0.mp4#0"]
    assert _exit(path, tmp_path)[0] == 1
    (tmp_path / "data/captions/captions.jsonl").unlink()
    result = verify(path, tmp_path)
    assert {m.name: m.status for m in result.manifests}["captions"] == "missing"
    assert _exit(path, tmp_path)[0] == 1


def test_params_that_differ_from_the_recorded_ones_fail(tmp_path: Path):
    """Params were recorded but never compared."""
    path = _lora_file(tmp_path)
    p = tmp_path / "params.yaml"
    p.write_text(p.read_text().replace("lr: 0.0001", "lr: 0.0002"))
    result = verify(path, tmp_path)
    assert [(c.key, c.recorded, c.now) for c in result.params] == [("train.lr", 0.0001, 0.0002)]
    assert "params differ: train.lr" in result.message
    code, out = _exit(path, tmp_path)
    assert code == 1 and "train.lr" in out
    p.write_text(p.read_text().replace("lr: 0.0002", "lr: 0.0001").replace("name: wan22_lora", "name: renamed"))
    assert verify(path, tmp_path).all_unchanged  # job.name is not a train param: it changes no LoRA


def test_random_tensors_under_a_copied_header_fail(tmp_path: Path):
    """Nothing tied the header to the weights: another LoRA's tensors under this header passed."""
    path = _lora_file(tmp_path)
    _, meta = load_safetensors(path)
    from wanlora.export.formats import write_ours

    sd, _ = write_ours(OTHER)
    forged = tmp_path / "forged.safetensors"
    save_safetensors(forged, sd, meta)
    result = verify(forged, tmp_path)
    assert not result.ok and "tensors are not the ones the header describes" in result.message
    assert _exit(forged, tmp_path)[0] == 2
    # a header of an older lineage (no tensor hash) is not vouched for either
    older = _rewrite_header(path, tmp_path / "older.safetensors", tensors_sha256=None, lineage_version="1")
    assert "records no tensor hash" in verify(older, tmp_path).message


def test_an_export_and_the_workspace_checkpoint_must_hold_the_same_tensors(tmp_path: Path):
    path = _lora_file(tmp_path)
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert verify(copy, tmp_path).all_unchanged
    save_checkpoint(tmp_path, OTHER, 100, "high")  # the workspace's step 100 now holds other weights
    result = verify(copy, tmp_path)
    assert result.ok and result.checkpoint.status == "changed"
    assert "checkpoint data/lora/high/step_000100.safetensors is changed" in result.message
    assert _exit(copy, tmp_path)[0] == 1
    path.unlink()
    assert verify(copy, tmp_path).checkpoint.status == "missing"


@pytest.mark.parametrize("field,value", [("path", "/etc/hostname"), ("caption_source", "../../../../etc/passwd"),
                                         ("path", "data/../../outside.mp4"), ("caption_source", "C:\\Users\\x.txt")])
def test_forged_paths_outside_the_workspace_are_refused_unread(tmp_path: Path, monkeypatch, field, value):
    """A forged header made audit hash /etc/hostname and read ../../../../etc/passwd."""
    path = _lora_file(tmp_path / "ws")
    _, meta = load_safetensors(path)
    samples = json.loads(meta["wanlora.samples"])
    samples[0][field] = value
    target = Path(value) if Path(value).is_absolute() else tmp_path / "ws" / value
    if field == "path" and target.is_file():
        samples[0]["sha256"] = sha256_file(target)  # the forger knows the file: it would read "unchanged"
    forged = _rewrite_header(path, tmp_path / "forged.safetensors", samples=json.dumps(samples))
    hashed = []
    real = audit_mod.sha256_file
    monkeypatch.setattr(audit_mod, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    result = verify(forged, tmp_path / "ws")
    assert not result.ok and "leaves the workspace" in result.message and repr(value) in result.message
    assert not any(value.lstrip("./") in h for h in hashed)
    assert _exit(forged, tmp_path / "ws")[0] == 2


def test_a_forged_sidecar_name_is_not_read(tmp_path: Path):
    path = _lora_file(tmp_path / "a" / "b" / "ws", n_clips=400)
    secret = tmp_path / "secret.json"
    secret.write_text("[]")
    forged = _rewrite_header(path, path.parent / "forged.safetensors", samples_sidecar="../../../../../secret.json")
    result = verify(forged, tmp_path / "a" / "b" / "ws")
    assert not result.ok and "not one wanlora writes" in result.message


def _raw_safetensors(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_a_huge_header_is_refused_before_it_is_parsed(tmp_path: Path):
    """A 100 MB header was accepted and took 2.7 GB; ours are far below the 4 MiB cap."""
    header = json.dumps({"__metadata__": {"wanlora.lineage_version": "2", "pad": "x" * (5 << 20)}}).encode()
    path = _raw_safetensors(tmp_path / "huge.safetensors", header)
    result = verify(path, tmp_path)
    assert not result.ok and "larger than a LoRA's can be (4 MiB)" in result.message
    assert _exit(path, tmp_path)[0] == 2


def test_deeply_nested_json_is_a_clear_error(tmp_path: Path):
    """Deep nesting raised RecursionError, a crash, in the header and in a metadata value."""
    deep = "[" * 100_000 + "]" * 100_000
    path = _raw_safetensors(tmp_path / "deep.safetensors", ('{"a": %s}' % deep).encode())
    result = verify(path, tmp_path)
    assert not result.ok and "nested too deeply" in result.message
    inner = _rewrite_header(_lora_file(tmp_path / "ws"), tmp_path / "inner.safetensors", samples=deep)
    result = verify(inner, tmp_path / "ws")
    assert not result.ok and "wanlora.samples is nested too deeply" in result.message
    assert _exit(inner, tmp_path / "ws")[0] == 2
