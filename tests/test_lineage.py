"""Lineage metadata: what a LoRA header records about its making, and that it is a function of
what the train stage declares (issue 16: two copies of one workspace wrote different headers)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from _helpers import captioned_samples, make_lineage_workspace
from wanlora import __version__
from wanlora.config import load_params, parse_params
from wanlora.export import lineage
from wanlora.io import sha256_file, sha256_text
from wanlora.pipeline import stage_values


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout.strip()


def _meta(ws: Path, params=None, **kw) -> dict[str, str]:
    trained, skipped = captioned_samples(ws)
    return lineage.lineage_metadata(params or load_params(ws / "params.yaml"), ws, 250, "low", "abc123",
                                    trained, skipped, **kw)


def test_lineage_records_declared_params_manifests_and_samples(tmp_path: Path):
    ws = make_lineage_workspace(tmp_path)
    params = load_params(ws / "params.yaml")
    meta = _meta(ws)

    assert all(isinstance(v, str) for v in meta.values())
    assert meta["wanlora.version"] == __version__ and meta["wanlora.lineage_version"] == "2"
    recorded = json.loads(meta["wanlora.params"])
    assert recorded == {k: v for k, v in stage_values("train", params).items() if k != "quantization.cache_dir"}
    assert recorded["train.lr"] == params.train.lr and recorded["job.seed"] == params.job.seed
    assert "job.name" not in recorded and "export.step" not in recorded and "sample.prompts" not in recorded
    assert json.loads(meta["wanlora.manifests"]) == {
        "captions": {"path": "data/captions/captions.jsonl", "sha256": sha256_file(ws / "data/captions/captions.jsonl")},
        "samples": {"path": "data/buckets/samples.jsonl", "sha256": sha256_file(ws / "data/buckets/samples.jsonl")}}
    assert (meta["wanlora.step"], meta["wanlora.expert"]) == ("250", "low")
    assert meta["wanlora.base_model"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers@main#abc123"
    assert (meta["wanlora.rank"], meta["wanlora.alpha"]) == ("16", "16.0")
    assert json.loads(meta["wanlora.target_modules"]) == params.network.target_modules
    samples = json.loads(meta["wanlora.samples"])
    assert [s["id"] for s in samples] == ["main/c0.mp4#0", "main/c0.mp4#1", "main/c1.mp4#0", "main/c1.mp4#1"]
    assert all(s["trained"] for s in samples)
    assert samples[0]["sha256"] == sha256_file(ws / "data/raw/c0.mp4")
    assert samples[0]["caption_source"] == "data/raw/c0.txt"
    assert samples[0]["caption_source_sha256"] == sha256_file(ws / "data/raw/c0.txt")
    assert samples[0]["caption_sha256"] == sha256_text("sks clip number 0")
    assert samples[3]["caption_source"] == "default"
    assert (samples[0]["caption_origin"], samples[3]["caption_origin"]) == ("file", "default")
    assert not {"git_commit", "git_dirty", "dvc_lock_sha256"} & set(lineage.lineage_fields(meta))


def test_header_lists_skipped_samples_as_not_trained(tmp_path: Path):
    """Issue 25 item 10 / issue 23: the demo's header listed a clip training skipped (no caption)
    like a trained one. Now it says which were not trained, and why, and keeps no hash for them."""
    ws = make_lineage_workspace(tmp_path, n_clips=2, uncaptioned=1)
    samples = {s["id"]: s for s in json.loads(_meta(ws)["wanlora.samples"])}
    assert samples["main/u0.mp4#0"] == {"id": "main/u0.mp4#0", "dataset": "main", "path": "data/raw/u0.mp4",
                                        "trained": False, "reason": "no caption for its clip"}
    assert samples["main/c0.mp4#0"]["trained"] is True
    with pytest.raises(ValueError, match="no trained samples"):
        lineage.lineage_metadata(load_params(ws / "params.yaml"), ws, 1, "high", "x", [], {})
    with pytest.raises(ValueError, match="not in the manifest"):
        lineage.lineage_metadata(load_params(ws / "params.yaml"), ws, 1, "high", "x", ["main/zz.mp4#0"], {})


def test_same_declared_inputs_same_header_in_another_copy(tmp_path: Path):
    """Issue 16's experiment: two copies of one workspace, identical params and data, one with a
    git history and a dvc.lock that records other runs. Their headers were different
    (git_commit, dvc_lock_sha256); now they are byte-identical."""
    a = make_lineage_workspace(tmp_path / "a")
    b = make_lineage_workspace(tmp_path / "b")
    (b / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {"train": {"outs": ["older run"]}}}))
    _git(b, "init", "-q")
    _git(b, "add", "-A")
    _git(b, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "other history")
    assert _meta(a) == _meta(b)
    (b / "params.yaml").write_text((b / "params.yaml").read_text() + "\n")  # a dirty tree changes nothing
    assert _meta(a) == _meta(b)


def test_paths_in_params_are_recorded_relative_to_the_workspace(tmp_path: Path):
    """Issue 22: exports carried absolute paths (user names, cache dirs). A model folder inside the
    workspace is recorded relative to it, one outside by its last name only; cache_dir not at all."""
    ws = make_lineage_workspace(tmp_path / "ws")
    inside = parse_params({"model": {"name_or_path": str(ws / "models" / "wan")},
                           "quantization": {"cache_dir": "/home/alice/.cache/quant",
                                            "recovery": {"source": str(tmp_path / "alice" / "adapter.safetensors")}}})
    meta = _meta(ws, inside)
    recorded = json.loads(meta["wanlora.params"])
    assert recorded["model.name_or_path"] == "models/wan"
    assert recorded["quantization.recovery.source"] == "external:adapter.safetensors"
    assert "quantization.cache_dir" not in recorded
    assert meta["wanlora.base_model"] == "models/wan@main#abc123"
    text = json.dumps(meta)
    assert str(tmp_path) not in text and "/home/alice" not in text


def test_large_sample_list_goes_to_a_content_addressed_sidecar(tmp_path: Path):
    ws = make_lineage_workspace(tmp_path, n_clips=400)  # 800 samples, ~200 KB of JSON
    trained, skipped = captioned_samples(ws)
    meta = lineage.lineage_metadata(parse_params({}), ws, 1, "high", "x", trained, skipped)
    assert "wanlora.samples" not in meta
    name = meta["wanlora.samples_sidecar"]
    sidecar = ws / "data/lora/high" / name
    text = sidecar.read_text()
    assert len(text) > lineage.INLINE_LIMIT
    digest = meta["wanlora.samples_sidecar_sha256"]
    assert sha256_text(text) == digest and name == f"lineage-{digest[:16]}.json"
    assert len(json.loads(text)) == 800
    assert lineage.sidecar_names(meta) == [name]


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "lineage-0123.json", "notes.json"])
def test_a_forged_sidecar_name_is_refused(name: str):
    """Issue 22: a sidecar name from a header was joined and copied unchecked."""
    meta = {"wanlora.samples_sidecar": name, "wanlora.samples_sidecar_sha256": "0" * 64}
    with pytest.raises(lineage.LineageError, match="not one wanlora writes"):
        lineage.sidecar_names(meta)


def test_two_copies_of_a_workspace_train_byte_identical_loras(tmp_path: Path):
    """Issue 16 / 25 item 1, built like the experiment: two copies of one workspace, identical
    params and data; one has a git history, a dvc.lock of other runs, and trained another
    configuration first. The tensors were identical and the files were not (`dvc_lock_sha256`,
    `git_commit`). Now the whole files are, and each one audits clean against its workspace; the
    sample training skipped (its clip has no caption) is recorded as not trained, with the reason."""
    from _helpers import copy_workspace, make_workspace, tiny_params

    from wanlora.config import dump_params
    from wanlora.export.audit import verify
    from wanlora.io import read_jsonl, write_jsonl
    from wanlora.train import loop

    a = make_workspace(tmp_path / "a", tmp_path / "model")
    rows = read_jsonl(a / "data/buckets/samples.jsonl")  # the helper's manifests name no real files: add them
    for i, r in enumerate(rows):
        (a / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        (a / r["path"]).write_bytes(f"clip {i}".encode())
        r["sha256"] = sha256_file(a / r["path"])
    write_jsonl(a / "data/buckets/samples.jsonl",
                [*rows, {**rows[0], "id": "main/nocap.mp4#0", "clip_id": "main/nocap.mp4", "path": "data/raw/nocap.mp4"}])
    captions = read_jsonl(a / "data/captions/captions.jsonl")
    write_jsonl(a / "data/captions/captions.jsonl", [{**c, "source_sha256": sha256_text("")} for c in captions])
    params = tiny_params(tmp_path / "model", train={"steps": 2}, save={"every": 2})
    (a / "params.yaml").write_text(dump_params(params))
    b = copy_workspace(a, tmp_path / "b")
    loop.run_stage(tiny_params(tmp_path / "model", train={"steps": 2, "lr": 5e-3}, save={"every": 2}), b)
    (b / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: an earlier run\n")
    _git(b, "init", "-q")
    _git(b, "add", "-A")
    _git(b, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "another history")

    loop.run_stage(params, a)
    loop.run_stage(params, b)
    files = sorted(p.relative_to(a) for p in (a / "data/lora").rglob("*.safetensors"))
    assert [f.as_posix() for f in files] == ["data/lora/high/step_000002.safetensors",
                                             "data/lora/low/step_000002.safetensors"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
        for ws in (a, b):
            result = verify(ws / f, ws)
            assert result.all_unchanged, result.message
            assert [(s.id, s.note) for s in result.samples if not s.trained] == [
                ("main/nocap.mp4#0", "no caption for its clip (see data/captions/problems.json)")]
