"""The `wanlora` command, smoke-tested through typer's runner; logic is tested where it lives."""

from pathlib import Path

import yaml
from typer.testing import CliRunner

from wanlora.cli import app, main
from wanlora.config import load_params

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in ("init", "sync", "demo", "make-tiny", "import-aitk", "plan", "audit", "export"):
        assert command in out.output


def test_init_writes_a_runnable_workspace(tmp_path: Path):
    out = runner.invoke(app, ["init", "--recipe", "style", "--vram", "80", "--workspace", str(tmp_path),
                              "--trigger", "w4ve"])
    assert out.exit_code == 0, out.output
    params = load_params(tmp_path / "params.yaml")
    assert params.job.trigger_word == "w4ve" and params.train.timestep_bias == "high_noise"
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert list(stages)[:2] == ["check", "scan"] and (tmp_path / "stages/train.py").is_file()
    # outside the repo, code deps are the stage scripts only (the package is in site-packages)
    assert not any(d.startswith("src/") for s in stages.values() for d in s["deps"])
    assert (tmp_path / ".dvc").is_dir() and (tmp_path / "data/raw").is_dir()
    again = runner.invoke(app, ["init", "--workspace", str(tmp_path)])
    assert again.exit_code != 0 and "--force" in again.output


def test_sync_follows_new_datasets(tmp_path: Path):
    assert runner.invoke(app, ["init", "--workspace", str(tmp_path)]).exit_code == 0
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["datasets"]["extra"] = {"folder": "data/extra"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = runner.invoke(app, ["sync", "--workspace", str(tmp_path)])
    assert "updated" in out.output and "dvc.yaml" in out.output
    assert "datasets.extra.trim.black_level" in (tmp_path / "dvc.yaml").read_text()
    assert "up to date" in runner.invoke(app, ["sync", "--workspace", str(tmp_path)]).output


def test_bad_params_print_a_readable_error(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("train:\n  stepz: 10\n")
    monkeypatch.setattr("sys.argv", ["wanlora", "sync", "--workspace", str(tmp_path)])
    try:
        main()
    except SystemExit as exit_:
        assert exit_.code == 2
    out = capsys.readouterr().out
    assert "train.stepz: unknown key; did you mean 'steps'?" in out


def test_demo_workspace_inside_an_ignoring_repo_gets_its_own_git(tmp_path: Path):
    """README's demo runs inside the wanlora checkout, which git-ignores demo-workspace/."""
    import subprocess

    from wanlora.demo import demo_params
    from wanlora.workspace import prepare

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/demo-workspace/\n")
    ws = tmp_path / "demo-workspace"
    prepare(ws, demo_params(4), own_repo=True)
    assert (ws / ".git").is_dir() and (ws / ".dvc").is_dir() and (ws / "dvc.yaml").is_file()
