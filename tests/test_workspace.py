"""Workspace setup and checks: what `wanlora init`, the check stage and `wanlora export` rely on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wanlora.config import ParamsError, load_params
from wanlora.errors import UserError
from wanlora.presets import make_params, write_params
from wanlora.workspace import check_stage, commit, prepare, set_param


def test_check_stage_refuses_stage_outputs_committed_to_git(tmp_path: Path):
    """The state the issue's "obvious repair" left: outputs in git make DVC refuse them after training."""
    params = make_params("smoke", 24)
    prepare(tmp_path, params)
    write_params(tmp_path / "params.yaml", params, "test")
    (tmp_path / "data/index").mkdir(parents=True)
    (tmp_path / "data/index/media.jsonl").write_text("")
    (tmp_path / "data/train_live").mkdir(parents=True)
    (tmp_path / "data/train_live/metrics.json").write_text("{}")
    subprocess.run(["git", "add", "-f", "data/index", "data/train_live"], cwd=tmp_path, check=True)
    with pytest.raises(UserError, match=r"git tracks stage outputs that DVC must own: data/index, data/train_live\. "
                                        r"Fix: `git rm -r -q --cached data/index data/train_live"):
        check_stage(tmp_path, tmp_path / "data/check.json")
    subprocess.run(["git", "rm", "-r", "-q", "--cached", "data/index", "data/train_live"], cwd=tmp_path, check=True)
    check_stage(tmp_path, tmp_path / "data/check.json")
    assert (tmp_path / "data/check.json").is_file()


def test_a_typo_added_after_a_run_stops_dvc_repro_before_any_other_stage(tmp_path: Path):
    """No stage lists train.learning_rate, so without the check stage DVC would find nothing changed
    ("Data and pipelines are up to date"); the check stage depends on params.yaml as a file."""
    params = make_params("smoke", 24)
    prepare(tmp_path, params)
    write_params(tmp_path / "params.yaml", params, "test")
    commit(tmp_path, "workspace")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = [sys.executable, "-m", "dvc", "repro"]
    first = subprocess.run([*dvc, "check"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert first.returncode == 0 and "Running stage 'check'" in first.stdout, first.stdout + first.stderr
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("\n  lr: ", "\n  learning_rate: 0.0002\n  lr: ", 1))
    done = subprocess.run(dvc, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert "train.learning_rate: unknown key; did you mean 'lr'?" in done.stdout + done.stderr
    assert re.findall(r"Running stage '(\w+)'", done.stdout) == ["check"]


def test_set_param_edits_one_line_and_keeps_comments(tmp_path: Path):
    path = tmp_path / "params.yaml"
    write_params(path, make_params("character", 24), "wanlora init --recipe character --vram 24\nwhy: because")
    before = path.read_text()
    set_param(path, ("export", "step"), "1500")
    after = path.read_text()
    assert after.startswith("# wanlora init --recipe character --vram 24\n# why: because\n")
    assert [a for a, b in zip(before.splitlines(), after.splitlines()) if a != b] == ["  step: best"]
    assert load_params(path).export.step == "1500"
    with pytest.raises(ParamsError, match="export.step: must be 'best', 'last' or a step number"):
        set_param(path, ("export", "step"), "latest")
    assert path.read_text() == after and not list(tmp_path.glob(".params.yaml*"))


def test_a_dataset_added_without_sync_stops_dvc_repro_at_the_check(tmp_path: Path):
    """dvc.yaml lists folders and params per dataset: a dataset added to params.yaml by hand would
    be read by no declared dependency, so the check stage names `wanlora sync`."""
    params = make_params("smoke", 24)
    prepare(tmp_path, params)
    write_params(tmp_path / "params.yaml", params, "test")
    commit(tmp_path, "workspace")
    (tmp_path / "data/more").mkdir(parents=True)
    with_more = params.model_copy(deep=True)
    with_more.datasets["more"] = with_more.datasets["main"].model_copy(update={"folder": "data/more"})
    write_params(tmp_path / "params.yaml", with_more, "test")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, capture_output=True, text=True,
                          env=env)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and "dvc.yaml no longer matches params.yaml" in out, out
    assert "Fix: run `wanlora sync`, then `dvc repro`" in out
    assert re.findall(r"Running stage '(\w+)'", done.stdout) == ["check"]


def test_a_stage_script_written_by_another_version_refuses_to_run(tmp_path: Path):
    """After an upgrade DVC sees the new package only through the stage scripts' version line."""
    prepare(tmp_path, make_params("smoke", 24))
    script = tmp_path / "stages/scan.py"
    script.write_text(re.sub(r"\(wanlora [^)]+\)", "(wanlora 0.0.1)", script.read_text(), count=1))
    done = subprocess.run([sys.executable, "-P", "stages/scan.py"], cwd=tmp_path, capture_output=True, text=True)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, out
    assert "stages/scan.py was written by wanlora 0.0.1, but wanlora" in out and "Fix: run `wanlora sync`" in out


def test_track_raw_refuses_a_link_even_to_a_file_inside_the_folder(tmp_path: Path):
    """`ln -s clip.mp4 data/raw/copy.mp4`: `dvc add` would turn the link into a second copy."""
    from wanlora.workspace import track_raw

    params = make_params("smoke", 24)
    prepare(tmp_path, params)
    (tmp_path / "data/raw/clip.mp4").write_bytes(b"clip")
    (tmp_path / "data/raw/copy.mp4").symlink_to("clip.mp4")
    with pytest.raises(UserError, match=r"holds symlinks .*\n  data/raw/copy.mp4\nFix: replace each link"):
        track_raw(tmp_path, params)
    assert (tmp_path / "data/raw/copy.mp4").is_symlink() and not (tmp_path / "data/raw.dvc").exists()


def test_stages_silence_the_bitsandbytes_kernel_fetch_warning(tmp_path):
    """On AVX-512 BF16 CPUs bitsandbytes' CPU backend logs, at import, that it could not fetch a
    Hub kernel (`backends/cpu/ops.py`); every model stage printed it. The logger name must be the
    one bitsandbytes uses, and a stage run through `_common.run` must not print the line."""
    import subprocess
    import sys

    import bitsandbytes.backends.cpu.ops as bnb_cpu

    from wanlora.stages import _common

    assert bnb_cpu.logger.name == _common.BNB_CPU_LOGGER
    emit = ("import logging\nlogging.getLogger('bitsandbytes.backends.cpu.ops')"
            ".warning('Failed to load CPU gemm_4bit_forward')\n")
    staged = "from wanlora.stages._common import run\ndef main():\n    " + emit.replace("\n", "\n    ") + "\nrun(main)\n"
    for code, printed in ((emit, True), (staged, False)):
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert ("gemm_4bit_forward" in done.stderr) is printed, done.stderr
