"""The real thing: `dvc repro` of the demo workspace, and DVC rerunning only what changed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wanlora.demo import make_demo
from wanlora.io import sha256_file

pytestmark = pytest.mark.slow


AUDIT = Path(__file__).with_name("_write_audit")  # its sitecustomize logs every write a stage opens


def _write_log(ws: Path) -> Path:
    return ws.parent / "writes.log"


def _repro(ws: Path) -> list[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")])),
           "WANLORA_WRITE_LOG": str(_write_log(ws))}
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.findall(r"Running stage '([\w]+)'", out.stdout)


def _raw_hashes(ws: Path) -> dict[str, str]:
    raw = ws / "data/raw"
    return {p.name: sha256_file(p) for p in sorted(raw.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("demo") / "ws"
    make_demo(ws, steps=6)
    return ws


def test_full_repro_then_nothing_reruns(workspace: Path):
    before = _raw_hashes(workspace)
    ran = _repro(workspace)
    stages = ["check", "scan", "trim", "autocaption", "bucket", "captions", "split", "review", "text_cache",
              "latent_cache", "train", "evaluate", "export"]
    assert sorted(ran) == sorted(stages)
    assert ran.index("trim") < ran.index("autocaption") < ran.index("captions") < ran.index("review")
    assert sorted(p.name for p in (workspace / "data/lora/high").glob("*.safetensors"))
    assert (workspace / "data/eval/report.html").is_file()
    _demo_validates_on_a_held_out_clip(workspace)
    _demo_autocaptions_its_uncaptioned_clip(workspace)
    assert _raw_hashes(workspace) == before, "raw data must never be modified"
    assert _repro(workspace) == []


def test_no_stage_writes_a_file_at_its_final_name(workspace: Path):
    """Every write a stage makes goes to a hidden temp file renamed into place (wanlora.io), so a
    kill anywhere leaves each final name whole. Checked on the first, full `dvc repro`: every file a
    stage process opened for writing under the workspace is a `.<name>.*.tmp` or lies in scratch/."""
    opened = [line.split("\t") for line in _write_log(workspace).read_text().splitlines()]
    assert {stage for stage, _ in opened} >= {"scan.py", "trim.py", "train.py", "evaluate.py", "export.py"}
    root = str(workspace.resolve()) + os.sep
    in_place = sorted({(stage, path[len(root):]) for stage, path in opened if path.startswith(root)
                       and not path[len(root):].startswith(("scratch/", ".dvc/"))  # .dvc: DVC's own (dvclive)
                       and not (Path(path).name.startswith(".") and Path(path).name.endswith(".tmp"))})
    assert not in_place, f"written at their final names: {in_place}"


def _demo_autocaptions_its_uncaptioned_clip(ws: Path) -> None:
    """run_cut.mp4 has no caption file: the tiny VLM captions it and it trains with that caption
    (origin auto); the review page shows it with its origin; no other clip is auto-captioned."""
    auto = [json.loads(line) for line in (ws / "data/autocaptions/captions.jsonl").open()]
    assert [(r["id"], r["status"]) for r in auto] == [("main/run_cut.mp4", "ok")]
    text = (ws / "data/autocaptions/main/run_cut.txt").read_text(encoding="utf-8").strip()
    assert text == auto[0]["caption"] and len(text.split()) >= 3
    records = {r["id"]: r for r in map(json.loads, (ws / "data/captions/captions.jsonl").open())}
    assert records["main/run_cut.mp4"]["origin"] == "auto"
    assert records["main/run_cut.mp4"]["caption"].startswith("zqx ")
    assert {r["origin"] for i, r in records.items() if i != "main/run_cut.mp4"} == {"file"}
    review = (ws / "data/review/index.html").read_text(encoding="utf-8")
    assert "data-sample='main/run_cut.mp4#0'" in review and "data/autocaptions/main/run_cut.txt" in review
    held = json.loads((ws / "data/split/validation.json").read_text())["held_out_clips"]
    assert all(f"data-sample='{c}#0' data-held-out" in review for c in held)
    assert 'href="../review/index.html"' in (ws / "data/eval/report.html").read_text(encoding="utf-8")


def _demo_validates_on_a_held_out_clip(ws: Path) -> None:
    """The demo holds a whole clip out, never trains on it, and its report shows per expert the
    training-clip and the held-out curve (issue 24); export says which step each file came from."""
    import json
    from html.parser import HTMLParser

    from safetensors import safe_open

    split = json.loads((ws / "data/split/validation.json").read_text())
    assert split["basis"] == "held_out" and len(split["held_out_clips"]) == 1
    lora = sorted((ws / "data/lora/low").glob("step_*.safetensors"))[-1]
    with safe_open(str(lora), framework="pt") as f:
        rows = json.loads(f.metadata()["wanlora.samples"])
    held = [r for r in rows if r["id"].split("#")[0] in split["held_out_clips"]]
    assert held and not any(r["trained"] for r in held)

    class Plots(HTMLParser):
        def __init__(self):
            super().__init__()
            self.plots: dict[str, list[tuple[str, int]]] = {}
            self._plot = None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "svg":
                self._plot = self.plots.setdefault(a["aria-label"], [])
            elif tag == "polyline":
                self._plot.append((a["data-name"], len(a["points"].split())))

    page = Plots()
    page.feed((ws / "data/eval/report.html").read_text())
    checkpoints = len(json.loads((ws / "data/eval/val_loss.json").read_text())) - 1  # less the base model
    for e in ("high", "low"):  # both curves, a point per checkpoint and the base model
        assert page.plots[f"{e}-noise expert: fixed-noise loss"] == [
            ("held-out", checkpoints + 1), ("training clips", checkpoints + 1)]
    best = json.loads((ws / "data/eval/best.json").read_text())["experts"]
    export = json.loads((ws / "data/exports/export.json").read_text())
    assert {e: p["step"] for e, p in export["experts"].items()} == {e: c["step"] for e, c in best.items()}
    assert all(p["basis"] == "held_out" and p["reason"] == best[e]["reason"] for e, p in export["experts"].items())


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd}: {out.stdout}{out.stderr}"
    return out


def test_team_workflow_push_clone_pull_audit(workspace: Path, tmp_path: Path):
    """A teammate clones the repo, pulls data and LoRAs from the remote, and audits the export."""
    from typer.testing import CliRunner

    from wanlora.cli import app

    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "remote", "add", "-d", "-f", "team", str(tmp_path / "remote")], workspace)
    _run(["git", "add", "-A"], workspace)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trained"], workspace)
    _run([*dvc, "push", "-q"], workspace)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    _run([*dvc, "pull", "-q"], clone)

    export = sorted((clone / "data/exports/comfyui").glob("*_high_noise.safetensors"))[0]
    result = CliRunner().invoke(app, ["audit", str(export), "--workspace", str(clone)])
    assert result.exit_code == 0, result.output
    assert "all sources, captions, manifests, params and the checkpoint match the workspace" in " ".join(
        result.output.split())

    caption = clone / "data/raw/dance_frozen_outro.txt"  # a trained clip (walk_black_intro is held out)
    caption.write_text(caption.read_text(encoding="utf-8") + " at dusk", encoding="utf-8")
    result = CliRunner().invoke(app, ["audit", str(export), "--workspace", str(clone)])
    assert result.exit_code == 1 and "changed" in result.output


def test_caption_edit_reruns_only_caption_stages(workspace: Path):
    caption = workspace / "data/raw/walk_black_intro.txt"
    caption.write_text(caption.read_text(encoding="utf-8") + " in the rain", encoding="utf-8")
    ran = _repro(workspace)
    assert "trim" not in ran and "bucket" not in ran and "latent_cache" not in ran
    assert ran[:3] == ["scan", "autocaption", "captions"] and "text_cache" in ran  # autocaption: a store hit


def test_autocaption_prompt_reruns_only_autocaption_and_what_follows(workspace: Path):
    """The demo's run_cut.mp4 has no caption file: the tiny VLM captions it, and a new prompt
    recaptions it without rescanning, retrimming or re-encoding any latents."""
    auto = (workspace / "data/autocaptions/main/run_cut.txt").read_text(encoding="utf-8")
    params_path = workspace / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["autocaption"]["prompt"] = "Describe the motion and the camera move."
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _repro(workspace)
    assert ran[:3] == ["check", "autocaption", "captions"]
    assert not {"scan", "trim", "bucket", "latent_cache"} & set(ran)
    assert (workspace / "data/autocaptions/main/run_cut.txt").read_text(encoding="utf-8") != auto
    records = {r["id"]: r for r in map(json.loads, (workspace / "data/captions/captions.jsonl").open())}
    assert records["main/run_cut.mp4"]["origin"] == "auto"
    assert records["main/walk_black_intro.mp4"]["origin"] == "file"


def test_adding_a_missing_caption_reruns_only_caption_stages(workspace: Path):
    """The fix the captions report suggests for a clip without a caption: trim and bucket keep.
    Autocaption reruns (the caption index changed) and drops run_cut.mp4, which now has a file."""
    assert not (workspace / "data/raw/run_cut.txt").exists()
    (workspace / "data/raw/run_cut.txt").write_text("[trigger] running, then a cut", encoding="utf-8")
    ran = _repro(workspace)
    assert ran[:3] == ["scan", "autocaption", "captions"] and "text_cache" in ran
    assert not {"trim", "bucket", "latent_cache"} & set(ran)


def test_train_param_reruns_no_data_stage(workspace: Path):
    params_path = workspace / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["lr"] = params["train"]["lr"] / 2
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _repro(workspace)
    # params.yaml changed, so the check stage validates it first; its unchanged output reruns nothing
    assert ran[:2] == ["check", "train"] and set(ran) <= {"check", "train", "evaluate", "export"}


def test_readme_versioning_commands_bring_back_an_older_version(workspace: Path, tmp_path: Path):
    """README "Versioning the data with the LoRAs": after `git clone` and `dvc pull`, checking out
    an older tag needs `dvc pull` (its data is only on the remote): `dvc checkout` alone fails."""
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    trained = _run(["git", "rev-list", "-1", "--grep=^trained$", "HEAD"], workspace).stdout.strip()
    assert trained, "test_team_workflow_push_clone_pull_audit commits the first trained version"
    _run([*git, "tag", "v1", trained], workspace)
    _run(["git", "add", "-A"], workspace)
    _run([*git, "commit", "-qm", "v2: half the learning rate"], workspace)
    _run([*git, "tag", "v2"], workspace)
    _run([*dvc, "push", "-q"], workspace)
    v1_lock = _run(["git", "show", "v1:dvc.lock"], workspace).stdout

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    _run([*dvc, "pull", "-q"], clone)
    _run(["git", "checkout", "-q", "v1"], clone)
    assert subprocess.run([*dvc, "checkout"], cwd=clone, capture_output=True).returncode != 0  # why README says pull
    _run([*dvc, "pull", "-q"], clone)  # the README's command
    assert (clone / "dvc.lock").read_text() == v1_lock
    assert "up to date" in _run([*dvc, "status"], clone).stdout
    lock = yaml.safe_load(v1_lock)
    lora = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "data/lora")
    status = _run([*dvc, "data", "status", "--granular", "--json"], clone).stdout
    assert "data/lora" not in status, status  # the checked-out LoRAs are v1's, unmodified
    assert lora["md5"].endswith(".dir")


def test_model_weights_edited_in_place_name_a_fix_that_works(workspace: Path):
    """DVC does not hash the model folder: after the VAE's weights change under the same path, the
    trainer's error must name a command that really rebuilds the latent cache."""
    from safetensors.torch import load_file, save_file

    vae_file = next((workspace / "models/tiny/vae").glob("*.safetensors"))
    weights = load_file(vae_file)
    save_file({k: v + 0.01 for k, v in weights.items()}, vae_file, metadata={"format": "pt"})
    params_path = workspace / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["lr"] = params["train"]["lr"] * 3  # any edit that reruns train
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    failed = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=workspace, env=env, capture_output=True,
                            text=True)
    assert failed.returncode != 0
    fix = re.search(r"`(dvc repro -f -s latent_cache)`, then run `dvc repro`", " ".join((failed.stdout + failed.stderr).split()))
    assert fix, failed.stdout + failed.stderr
    subprocess.run([sys.executable, "-m", *fix.group(1).split()], cwd=workspace, env=env, check=True,
                   capture_output=True)
    assert "train" in _repro(workspace)
