"""Lineage metadata: what a LoRA header records about its making."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests._eval_helpers import make_lineage_workspace
from wanlora import __version__
from wanlora.config import load_params, parse_params
from wanlora.export import lineage
from wanlora.io import sha256_file, sha256_text
from wanlora.pipeline import stage_values


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout.strip()


def test_lineage_records_code_params_manifests_and_samples(tmp_path: Path):
    ws = make_lineage_workspace(tmp_path)
    _git(ws, "init", "-q")
    _git(ws, "add", "params.yaml", "dvc.lock")
    _git(ws, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    params = load_params(ws / "params.yaml")
    meta = lineage.lineage_metadata(params, ws, step=250, expert="low", base_identity="models/tiny@main")

    assert all(isinstance(v, str) for v in meta.values())
    assert meta["wanlora.version"] == __version__
    assert meta["wanlora.git_commit"] == _git(ws, "rev-parse", "HEAD") and meta["wanlora.git_dirty"] == "false"
    assert json.loads(meta["wanlora.params"]) == stage_values("train", params)
    assert json.loads(meta["wanlora.params"])["train.lr"] == params.train.lr
    assert not any(key.startswith("sample.") for key in json.loads(meta["wanlora.params"]))
    assert meta["wanlora.dvc_lock_sha256"] == sha256_file(ws / "dvc.lock")
    manifests = json.loads(meta["wanlora.manifests"])
    assert manifests["captions"] == {"path": "data/captions/captions.jsonl",
                                     "sha256": sha256_file(ws / "data/captions/captions.jsonl")}
    assert (meta["wanlora.step"], meta["wanlora.expert"]) == ("250", "low")
    assert meta["wanlora.base_model"] == "models/tiny@main"
    assert (meta["wanlora.rank"], meta["wanlora.alpha"]) == ("16", "16.0")
    assert json.loads(meta["wanlora.target_modules"]) == params.network.target_modules
    samples = json.loads(meta["wanlora.samples"])
    assert [s["id"] for s in samples] == ["main/c0.mp4#0", "main/c0.mp4#1", "main/c1.mp4#0", "main/c1.mp4#1"]
    assert samples[0]["sha256"] == sha256_file(ws / "data/raw/c0.mp4")
    assert samples[0]["caption_source"] == "data/raw/c0.txt"
    assert samples[0]["caption_source_sha256"] == sha256_file(ws / "data/raw/c0.txt")
    assert samples[0]["caption_sha256"] == sha256_text("sks clip number 0")
    assert samples[3]["caption_source"] == "default"

    (ws / "params.yaml").write_text((ws / "params.yaml").read_text() + "\n")
    dirty = lineage.lineage_metadata(params, ws, step=250, expert="low", base_identity="x")
    assert dirty["wanlora.git_dirty"] == "true"


def test_lineage_without_git_says_unknown(tmp_path: Path):
    ws = make_lineage_workspace(tmp_path)
    (ws / "dvc.lock").unlink()
    meta = lineage.lineage_metadata(parse_params({}), ws, step=1, expert="high", base_identity="x")
    assert (meta["wanlora.git_commit"], meta["wanlora.git_dirty"]) == ("unknown", "unknown")
    assert meta["wanlora.dvc_lock_sha256"] == "absent"


def test_large_sample_list_goes_to_a_content_addressed_sidecar(tmp_path: Path):
    ws = make_lineage_workspace(tmp_path, n_clips=400)  # 800 samples, ~200 KB of JSON
    meta = lineage.lineage_metadata(parse_params({}), ws, step=1, expert="high", base_identity="x")
    assert "wanlora.samples" not in meta
    name = meta["wanlora.samples_sidecar"]
    sidecar = ws / "data/lora/high" / name
    text = sidecar.read_text()
    assert len(text) > lineage.INLINE_LIMIT
    digest = meta["wanlora.samples_sidecar_sha256"]
    assert sha256_text(text) == digest and name == f"lineage-{digest[:16]}.json"
    assert len(json.loads(text)) == 800
    assert lineage.sidecar_names(meta) == [name]
