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


def _plotted(tmp_path: Path, params, rows: list[dict]) -> dict:
    """`dvc plots show --json` in a scratch DVC repo holding the dvc.yaml `wanlora sync` writes for
    these params and a val_loss.json of these rows (the evaluate stage's `train_<expert>` and
    `held_out_<expert>` fields, null where not measured)."""
    import json
    import os
    import subprocess

    (tmp_path / "data/eval").mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text(dvc_yaml(params, in_repo=False))
    (tmp_path / "data/eval/val_loss.json").write_text(json.dumps(rows))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    done = subprocess.run(["dvc", "plots", "show", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def test_ti2v_5b_workspace_plots_the_main_experts_fixed_noise_loss(tmp_path: Path):
    """TI2V 5B has one transformer, `main`: its fixed-noise loss is a plot of its own (the A14B
    experts' plots would find no field and be skipped, with a warning), as with `auto` and the
    5B hub id; an A14B workspace keeps its two plots and declares no `main`."""
    from wanlora.presets import make_params

    five_b = make_params("smoke", 24, variant="ti2v-5b")
    assert five_b.model.variant == "ti2v-5b"
    shown = _plotted(tmp_path / "5b", five_b, [{"step": s, "train_main": 1.0 / (s + 1), "held_out_main": None}
                                                for s in (0, 4, 8)])
    # the other plots' files are absent here: only the fixed-noise plots' errors count
    assert [e for e in shown.get("errors", []) if e["name"].startswith("fixed_noise")] == []
    assert [name for name in shown["data"] if name.startswith("fixed_noise")] == ["fixed_noise_loss_main"]
    (plot,) = shown["data"]["fixed_noise_loss_main"]
    drawn = [(v["field"], v["step"], v["dvc_inferred_y_value"]) for v in plot["content"]["data"]["values"]]
    assert [d for d in drawn if d[0] == "train_main"] == [("train_main", 0, 1.0), ("train_main", 4, 0.2),
                                                          ("train_main", 8, 1 / 9)]
    assert plot["content"]["title"]["text"] == "transformer: fixed-noise loss"

    auto = five_b.model_copy(update={"model": five_b.model.model_copy(update={"variant": "auto"})})
    assert auto.model.name_or_path == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert dvc_yaml(auto, in_repo=False) == dvc_yaml(five_b, in_repo=False)
    a14b = yaml.safe_load(dvc_yaml(make_params("smoke", 24), in_repo=False))["plots"]
    assert [next(iter(p)) for p in a14b if next(iter(p)).startswith("fixed_noise")] == [
        "fixed_noise_loss_high", "fixed_noise_loss_low"]
