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


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """Run the console entry as a shell would; (exit status, what it printed)."""
    monkeypatch.setattr("sys.argv", ["wanlora", *argv])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().out


def test_init_commits_and_ignores_every_stage_output_before_the_first_repro(tmp_path: Path):
    """dvclive needs a HEAD commit; outputs of a failed first run must not be taken by `git add -A`."""
    import subprocess

    from wanlora.pipeline import STAGES

    assert runner.invoke(app, ["init", "--workspace", str(tmp_path)]).exit_code == 0
    head = subprocess.run(["git", "log", "--format=%s"], cwd=tmp_path, capture_output=True, text=True)
    assert head.returncode == 0 and head.stdout.startswith("wanlora init --recipe character --vram 24")
    for out in (o for s in STAGES for o in s.outs):  # what a failed first run leaves behind
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "partial.json").write_text("{}")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=tmp_path, capture_output=True,
                            text=True).stdout.split()
    assert not [f for f in staged if f.startswith("data/")], staged
    text = (tmp_path / "dvc.yaml").read_text()
    assert "src/wanlora/pipeline.py" not in text and "run `wanlora sync`" in text.splitlines()[1]


def test_init_checks_the_model_folder_at_once(tmp_path: Path, monkeypatch, capsys):
    code, out = _main(monkeypatch, capsys, "init", "-w", str(tmp_path), "--model", str(tmp_path / "no/such/wan"))
    assert code == 2 and "no such folder" in out and "model_index.json" in out
    assert not (tmp_path / "params.yaml").exists()
    code, out = _main(monkeypatch, capsys, "init", "-w", str(tmp_path), "--model", "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert code == 0 and "is a hub id, downloaded by the first `dvc repro`" in out


def test_version():
    from wanlora import __version__

    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"wanlora {__version__}"


def test_commands_outside_a_workspace_say_where_it_is(tmp_path: Path, monkeypatch, capsys):
    """From the folder above the workspace (or a subfolder of it), every command names the workspace
    instead of suggesting `wanlora init`, and audit does not report clips as missing (exit 1)."""
    ws = tmp_path / "my-lora"
    assert runner.invoke(app, ["init", "--workspace", str(ws)]).exit_code == 0
    lora = tmp_path / "x_high_noise.safetensors"  # a file with lineage: only that needs a workspace
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(lora), metadata={"wanlora.lineage_version": "2"})
    monkeypatch.chdir(tmp_path)
    for argv in (["plan"], ["export", "--step", "last"], ["sync"], ["audit", str(lora)],
                 ["import-lora", str(lora), "out.safetensors"]):
        code, out = _main(monkeypatch, capsys, *argv)
        assert code == 2, (argv, out)
        assert f"is not a wanlora workspace (no params.yaml); found one at {ws}: `cd` there or pass `-w {ws}`" in out
        assert "Traceback" not in out
    (ws / "data/raw/sub").mkdir(parents=True)
    monkeypatch.chdir(ws / "data/raw/sub")
    code, out = _main(monkeypatch, capsys, "plan")
    assert code == 2 and f"found one at {ws}" in out
    monkeypatch.chdir(tmp_path.parent)
    code, out = _main(monkeypatch, capsys, "plan", "-w", str(tmp_path / "elsewhere"))
    assert code == 2 and "`cd` into the folder `wanlora init` made or pass `-w FOLDER`" in out


def _trained_workspace(ws: Path, steps: tuple[int, ...]) -> None:
    """A workspace with checkpoint files where the train stage puts them (the names are what count)."""
    assert runner.invoke(app, ["init", "--workspace", str(ws)]).exit_code == 0
    for expert in ("high", "low"):
        (ws / "data/lora" / expert).mkdir(parents=True)
        for step in steps:
            (ws / "data/lora" / expert / f"step_{step:06d}.safetensors").write_bytes(b"")


def test_export_errors_are_one_message(tmp_path: Path, monkeypatch, capsys):
    _trained_workspace(tmp_path, (2, 4))
    before = (tmp_path / "params.yaml").read_text()
    code, out = _main(monkeypatch, capsys, "export", "--step", "30", "-w", str(tmp_path))
    assert (code, out.strip()) == (2, "error: no checkpoint for step 30; available steps: 2, 4")
    code, out = _main(monkeypatch, capsys, "export", "--step", "latest", "-w", str(tmp_path))
    assert code == 2 and "export.step: must be 'best', 'last' or a step number (got 'latest')" in out
    assert "Traceback" not in out and (tmp_path / "params.yaml").read_text() == before


def test_export_writes_data_exports_through_the_export_stage(tmp_path: Path, monkeypatch, capsys):
    """One place: the chosen step goes into params.yaml (comments kept) and DVC's export stage writes
    data/exports/, so dvc.lock records it; nothing is written to ./exports/."""
    _trained_workspace(tmp_path, (2, 4))
    ran = []
    monkeypatch.setattr("wanlora.workspace.dvc_repro", lambda ws, *args: ran.append((ws, args)))
    code, out = _main(monkeypatch, capsys, "export", "--step", "2", "-w", str(tmp_path))
    assert code == 0, out
    assert "export.step best -> 2" in out and ran == [(tmp_path, ("--single-item", "export"))]
    text = (tmp_path / "params.yaml").read_text()
    assert text.startswith("# wanlora init --recipe character --vram 24\n") and "\n  step: '2'\n" in text
    assert load_params(tmp_path / "params.yaml").export.step == "2"
    assert not (tmp_path / "exports").exists()


def test_plan_defaults_to_the_init_tier_and_exits_1_when_it_does_not_fit(tmp_path: Path, monkeypatch, capsys):
    assert runner.invoke(app, ["init", "--vram", "80", "--workspace", str(tmp_path)]).exit_code == 0
    code, out = _main(monkeypatch, capsys, "plan", "-w", str(tmp_path))
    assert code == 0 and "on a 80 GiB GPU: fits" in out
    code, out = _main(monkeypatch, capsys, "plan", "--gpu-gib", "16", "-w", str(tmp_path))
    assert code == 1 and "on a 16 GiB GPU: does NOT fit" in out


def test_plan_gpus_option_predicts_the_launch(tmp_path: Path, monkeypatch, capsys):
    assert runner.invoke(app, ["init", "--vram", "80", "--workspace", str(tmp_path)]).exit_code == 0
    code, out = _main(monkeypatch, capsys, "plan", "--gpus", "4", "-w", str(tmp_path))
    assert code == 0 and "4 GPUs: 4 replicas, expert-parallel (each GPU holds one expert)" in out


def test_plan_of_a_cpu_run_says_so(tmp_path: Path, monkeypatch, capsys):
    assert runner.invoke(app, ["init", "--recipe", "smoke", "--workspace", str(tmp_path)]).exit_code == 0
    code, out = _main(monkeypatch, capsys, "plan", "-w", str(tmp_path))
    assert code == 0 and out.startswith("job.device is cpu: training uses no GPU") and "GiB GPU" not in out


def test_plan_reports_a_params_error_before_importing_torch(tmp_path: Path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 0.1\n")
    code = ("import sys\nfrom wanlora.cli import main\nsys.argv = ['wanlora', 'plan']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert "train.learning_rate: unknown key; did you mean 'lr'?" in done.stdout
    assert done.stdout.strip().endswith("exit 2 False"), done.stdout + done.stderr


def test_output_is_not_cut_at_80_columns_when_piped():
    from wanlora.cli import console

    assert console.width >= 160 and console.soft_wrap


def test_demo_into_someone_elses_folder_is_one_message(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "thesis.tex").write_text("mine")
    code, out = _main(monkeypatch, capsys, "demo", str(tmp_path), "--no-run")
    assert (code, out.strip()) == (2, f"error: {tmp_path} exists and is not a wanlora workspace; pick a new folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_import_lora_reads_a_relative_model_folder_from_the_workspace(tmp_path: Path, monkeypatch):
    """`import-lora -w DIR` from elsewhere: models/tiny is DIR's, not the current folder's (it fell
    through to the hub with a traceback)."""
    from wanlora.export import formats

    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", "--workspace", str(ws)]).exit_code == 0
    (ws / "models/tiny").mkdir(parents=True)
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(text.replace("name_or_path: Wan-AI/Wan2.2-T2V-A14B-Diffusers", "name_or_path: models/tiny"))
    seen = []

    def fake(name, revision):
        seen.append(name)
        raise formats.LoraFormatError("stop here")

    monkeypatch.setattr(formats, "load_base_config", fake)
    monkeypatch.chdir(tmp_path)
    runner.invoke(app, ["import-lora", str(tmp_path / "x.safetensors"), "out.safetensors", "-w", str(ws)])
    assert seen == [str(ws / "models/tiny")]
