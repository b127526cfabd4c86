"""The generated pipeline files match the stage table, and params keys are real leaves."""

from pathlib import Path

import yaml

from wanlora.config import load_params, parse_params
from wanlora.pipeline import STAGES, dvc_yaml, leaf_keys, stage_params, stage_script

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_dvc_yaml_matches_stage_table():
    params = load_params(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(params, in_repo=True), "run `wanlora sync`"


def test_checked_in_stage_scripts_match_and_are_thin():
    for stage in STAGES:
        text = (ROOT / "stages" / f"{stage.name}.py").read_text()
        assert text == stage_script(stage)
        assert len(text.splitlines()) <= 6


def test_every_declared_code_dep_exists():
    params = load_params(ROOT / "params.yaml")
    for name, stage in yaml.safe_load(dvc_yaml(params, in_repo=True))["stages"].items():
        for dep in stage["deps"]:
            if dep.startswith(("src/", "stages/")):
                assert (ROOT / dep).exists(), f"stage {name}: code dep {dep} missing"


def test_params_are_leaf_keys_and_expand_per_dataset():
    params = parse_params({"datasets": {"a": {"folder": "x"}, "b": {"folder": "y"}}})
    trim = next(s for s in STAGES if s.name == "trim")
    keys = stage_params(trim, params)
    assert "datasets.a.trim.black_level" in keys and "datasets.b.trim.letterbox" in keys
    assert "datasets.a.trim" not in keys
    assert leaf_keys("train.dop", params) == [
        "train.dop.enabled", "train.dop.multiplier", "train.dop.preservation_class"]


def test_train_params_never_rerun_data_stages():
    params = load_params(ROOT / "params.yaml")
    for stage in STAGES:
        if stage.name in ("scan", "trim", "bucket", "captions", "latent_cache"):
            assert not [k for k in stage_params(stage, params) if k.startswith(("train.", "network.", "save."))
                        and k not in ("train.dop.preservation_class", "train.latent_mode", "train.last_frame",
                                       "train.unload_text_encoder")]


def test_readme_params_reference_is_current():
    from wanlora.paramsdoc import END, START, markdown

    text = (ROOT / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == markdown(), "run `python -m wanlora.paramsdoc README.md`"
