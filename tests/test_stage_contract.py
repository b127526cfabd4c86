"""Each stage's `Stage` entry is the truth DVC acts on: it must list every params key the stage
reads and every wanlora file it imports, or an edit to an undeclared one silently reruns nothing.

Built like the experiment that found the drift: every stage's entry point runs, in a fresh
interpreter, on a tiny demo workspace, with params access and imports recorded
(`tests/_stage_probe.py`), and the record is compared with `wanlora.pipeline.STAGES`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wanlora.config import load_params
from wanlora.demo import make_demo
from wanlora.pipeline import BASE_CODE, STAGES, stage_params

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("_stage_probe.py")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    """Run every stage once, in pipeline order, each in its own interpreter."""
    ws = tmp_path_factory.mktemp("contract") / "ws"
    make_demo(ws, steps=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH")]))}
    out: dict[str, dict] = {}
    for stage in STAGES:
        record = ws / f".probe_{stage.name}.json"
        result = subprocess.run([sys.executable, "-P", str(PROBE), stage.name, str(record)], cwd=ws, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and record.is_file(), result.stdout + result.stderr
        out[stage.name] = json.loads(record.read_text())
        assert out[stage.name]["exit"] == 0, f"stage {stage.name} failed:\n{result.stdout}{result.stderr}"
    out["_params"] = {"path": str(ws / "params.yaml")}
    return out


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_stage_reads_only_declared_params(records, stage):
    params = load_params(Path(records["_params"]["path"]))
    declared = set(stage_params(stage, params))
    undeclared = sorted(set(records[stage.name]["read"]) - declared)
    assert not undeclared, f"stage {stage.name} reads params it does not declare in pipeline.py: {undeclared}"


def _declared_files(stage) -> list[str]:
    return [*BASE_CODE, f"src/wanlora/stages/{stage.name}.py", *stage.code]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_stage_imports_only_declared_code(records, stage):
    declared = _declared_files(stage)

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)

    undeclared = sorted(f for f in records[stage.name]["files"] if not covered(f) and not _inert_init(f))
    assert not undeclared, f"stage {stage.name} imports wanlora files it does not declare as code deps: {undeclared}"


def _inert_init(path: str) -> bool:
    """A package `__init__.py` that holds only a docstring changes no stage's behaviour."""
    if not path.endswith("__init__.py"):
        return False
    import ast

    source = (Path(__file__).parents[1] / path).read_text(encoding="utf-8")
    body = ast.parse(source).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _covered(path: str, declared) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def _stage_paths(records, stage, kind: str) -> tuple[list[str], list[str]]:
    """The paths under data/ the stage touched this way: (outside the dataset folders, inside them)."""
    params = load_params(Path(records["_params"]["path"]))
    folders = [ds.folder for ds in params.datasets.values()]
    touched = [p for p in records[stage.name]["paths"][kind] if p.startswith("data/")]
    return ([p for p in touched if not _covered(p, folders)], [p for p in touched if _covered(p, folders)])


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_stage_reads_and_writes_only_declared_paths(records, stage):
    """What a stage opens under data/ is a dep or one of its outs, and what it writes is an out:
    a path typed in the code apart from the `Stage` entry would be read without DVC rerunning the
    stage when it changes. Only stages that depend on the dataset folders list them (the others
    read the files the scan stage indexed and hashed, as its index names them)."""
    read, _ = _stage_paths(records, stage, "read")
    listed, listed_raw = _stage_paths(records, stage, "listed")
    written, written_raw = _stage_paths(records, stage, "written")
    inputs = (*stage.deps, *stage.outs)
    assert not [p for p in read + listed if not _covered(p, inputs)], f"stage {stage.name} reads undeclared paths"
    assert not [p for p in written if not _covered(p, stage.outs)], f"stage {stage.name} writes undeclared paths"
    assert not written_raw, f"stage {stage.name} writes into a dataset folder: {written_raw}"
    assert stage.dataset_folders or not listed_raw, f"stage {stage.name} walks a dataset folder: {listed_raw}"


def test_probe_records_reads(records):
    """The recorder itself sees reads (else the tests above pass vacuously)."""
    assert "train.lr" in records["train"]["read"]
    assert "datasets.main.trim.black_level" in records["trim"]["read"]
    assert "src/wanlora/train/loop.py" in records["train"]["files"]
    assert "data/buckets/samples.jsonl" in records["split"]["paths"]["read"]
    assert "data/split/validation.json" in records["split"]["paths"]["written"]
    assert "data/raw" in records["scan"]["paths"]["listed"]
    # autocaption and review take every path from their Stage entry: the probe sees them used
    assert {"data/trimmed/clips.jsonl", "data/index/captions.jsonl"} <= set(records["autocaption"]["paths"]["read"])
    assert "data/autocaptions/captions.jsonl" in records["autocaption"]["paths"]["written"]
    assert {"data/captions/captions.jsonl", "data/buckets/samples.jsonl", "data/index/problems.json",
            "data/split/validation.json"} <= set(records["review"]["paths"]["read"])
    assert "data/review/index.html" in records["review"]["paths"]["written"]
