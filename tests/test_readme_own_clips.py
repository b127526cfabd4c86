"""The README's "Training on your own clips" commands, run verbatim as a first-time user would,
and its "Running and comparing experiments" commands after them.

The shell lines are read from README.md, so the README cannot change without this test seeing it.
They run in one bash script (`set -e`: the first failing line stops it, as it would stop a person)
in a fresh folder whose $HOME holds generated clips in `~/clips` (one without a caption) and a git
identity. The only substitution is the model: the tiny model the first block makes stands in for
`/path/to/Wan2.2-T2V-A14B-Diffusers`. The second block's `dvc repro` is the GPU run of the 24 GB
recipe (2,500 steps at 33 frames @512²); the test runs `dvc status` in its place and checks what
it would rerun, leaves out the audit of the export that run would make, and runs every other line
of that block as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wanlora.media.synth import ClipSpec, make_clip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = "/path/to/Wan2.2-T2V-A14B-Diffusers"
ALL_STAGES = ["check", "scan", "trim", "autocaption", "bucket", "captions", "split", "review", "text_cache",
              "latent_cache", "train", "evaluate", "export"]


def readme_blocks(heading: str = "Training on your own clips") -> list[list[str]]:
    """The bash blocks of a README section (the own-clips one by default), as lists of command lines."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def _user_home(tmp_path: Path) -> Path:
    """A $HOME as the README assumes it: ~/clips with same-stem captions (one missing), git set up."""
    home = tmp_path / "home"
    clips = home / "clips"
    clips.mkdir(parents=True)
    for i in range(5):
        make_clip(clips / f"take{i}.mp4", ClipSpec(width=96, height=64, fps=24, moving=24, seed=i))
        if i != 4:
            (clips / f"take{i}.txt").write_text(f"[trigger] walking through scene {i}", encoding="utf-8")
    (home / ".gitconfig").write_text("[user]\n\tname = New User\n\temail = new@example.com\n", encoding="utf-8")
    return home


def _run(lines: list[str], tmp_path: Path) -> tuple[int, dict[str, str]]:
    """Run `lines` as one bash script in tmp_path; returns its exit status and each line's output,
    keyed by the line (a line run twice gets ' #2')."""
    keys: list[str] = []
    script = ["set -eo pipefail"]
    for i, line in enumerate(lines):
        key = line if line not in keys else f"{line} #{keys.count(line) + 1}"
        keys.append(key)
        script += [f"echo '@@{i}'", line]
    env = {**os.environ, "HOME": str(_user_home(tmp_path)), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts = re.split(r"^@@(\d+)\n", done.stdout, flags=re.M)
    outputs = {keys[int(parts[j])]: parts[j + 1] for j in range(1, len(parts), 2)}
    return done.returncode, outputs


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout


def _stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_own_clips_path_reaches_an_audited_export_and_a_second_repro_does_nothing(tmp_path: Path):
    smoke, real = readme_blocks()
    assert any(line.startswith("dvc repro") for line in smoke) and any(REAL_MODEL in line for line in real)
    real = [line.replace(REAL_MODEL, "$PWD/models/tiny") for line in real]
    real = ["dvc status" if line.split("#")[0].strip() == "dvc repro" else line for line in real
            if not line.startswith("wanlora audit")]
    again = "dvc repro  # the test's own: a second run reruns nothing"
    rc, out = _run([*smoke, again, *real], tmp_path)
    log = "".join(out.values())
    assert rc == 0, log[-6000:]

    first = next(out[line] for line in smoke if line.startswith("dvc repro"))
    assert _stages(first) == ALL_STAGES, first[-3000:]
    assert _stages(out[again]) == [] and "Data and pipelines are up to date" in out[again]
    audit = next(out[line] for line in smoke if line.startswith("wanlora audit"))
    # the clip copied without a caption: each of its windows is listed as not trained
    not_trained = re.search(r"(\d+) not trained; all sources, captions, manifests, params and the checkpoint "
                            r"match the workspace", " ".join(audit.split()))
    assert not_trained and int(not_trained.group(1)) >= 1, audit

    ws = tmp_path / "my-lora"
    exports = sorted(p.name for p in (ws / "data/exports/comfyui").glob("*_high_noise.safetensors"))
    assert exports == ["wan22_lora_step000008_high_noise.safetensors"]
    # the 24 GB recipe keeps the indexed and trimmed clips and reruns what reads the new recipe and model
    status = out["dvc status"]
    assert {"check:", "bucket:", "captions:", "text_cache:", "latent_cache:", "train:"} <= set(status.split())
    assert "scan:" not in status.split() and "trim:" not in status.split()
    assert "fits" in next(out[line] for line in real if line.startswith("wanlora plan"))
    # the final commit holds the clips' .dvc file and dvc.lock, and no stage output
    assert _git(ws, "status", "--porcelain") == ""
    tracked = _git(ws, "ls-files").split()
    assert "data/raw.dvc" in tracked and "dvc.lock" in tracked
    assert not [f for f in tracked if f.startswith(("data/index", "data/cache", "data/lora", "data/train_live",
                                                    "data/exports", "data/captions", "data/trimmed"))]


def test_a_params_typo_stops_the_first_repro_with_did_you_mean(tmp_path: Path):
    smoke, _ = readme_blocks()
    at = next(i for i, line in enumerate(smoke) if line.startswith("wanlora init"))
    typo = r"sed -i 's/^  lr: /  learning_rate: 0.0002\n  lr: /' params.yaml"  # AI Toolkit's name beside ours
    rc, out = _run([*smoke[: at + 1], typo, *smoke[at + 1:]], tmp_path)
    repro = next(line for line in smoke if line.startswith("dvc repro"))
    assert rc != 0 and list(out)[-1] == repro, "the first `dvc repro` must be the line that fails"
    assert "train.learning_rate: unknown key; did you mean 'lr'?" in out[repro]
    assert _stages(out[repro]) == ["check"]
    assert not (tmp_path / "my-lora/data/index").exists()


def test_readme_experiments_compare_on_the_summary_columns(tmp_path: Path):
    """The smoke block, then the experiments block as written: two `dvc exp run -S train.lr=...`
    in the workspace `wanlora init` made. `dvc exp show --csv`, where the README compares, lists the
    summary columns of both metrics files, each named experiment's own values in them, and no column
    that names a step; after the commit that keeps one, the block's last line (`dvc exp show -n 2`)
    still lists both names, which hang off the commit before (a plain `dvc exp show` shows only the
    current commit's experiments); `dvc plots diff` drew both; `dvc exp apply` brought the chosen
    one's params and metrics back."""
    import csv
    import io
    import json

    import yaml

    smoke, _ = readme_blocks()
    (block,) = readme_blocks("Running and comparing experiments")
    assert sum(line.startswith("dvc exp run -n") for line in block) == 2
    assert block[-1].startswith("dvc exp show -n 2 ") and block[-2].startswith("git add -A && git commit")
    at = next(i for i, line in enumerate(block) if line.startswith("dvc exp show"))
    show = "dvc exp show --csv  # the test's own: the README's comparing line, as csv"
    later = "dvc exp show -n 2 --csv  # the test's own: the README's last line, as csv"
    rc, out = _run([*smoke, *block[: at + 1], show, *block[at + 1:], later], tmp_path)
    assert rc == 0, "".join(out.values())[-6000:]
    runs = [line for line in block if line.startswith("dvc exp run")]
    for line in runs:  # the caches and the index are kept: only what reads train.lr reruns (check always runs)
        assert _stages(out[line]) == ["check", "train", "evaluate", "export"], out[line][-3000:]

    ws = tmp_path / "my-lora"
    table = list(csv.DictReader(io.StringIO(out[show])))
    sections = set(yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8")))
    meta = {"Experiment", "rev", "typ", "Created", "parent"}
    # the rest are params (section.key) and deps (paths): what is left is every metrics column
    metrics = {c for c in table[0] if c not in meta and "/" not in c and c.split(".")[0] not in sections
               and not (ws / c).is_file()}  # params.yaml: the check stage's file dep
    assert metrics == {"basis", "held_out_clips", "last_step", "samples_per_s", "step_time_s", "peak_mem_gib", "train_s",
                       *(f"{k}_{e}" for e in ("high", "low") for k in ("best_step", "val_loss_best", "val_loss_last",
                                                                         "train_loss_smoothed"))}
    by_name = {row["Experiment"]: row for row in table if row["Experiment"]}
    assert set(by_name) == {"lr-2e-4", "lr-5e-5"}
    assert float(by_name["lr-2e-4"]["train.lr"]) == 2e-4 and float(by_name["lr-5e-5"]["train.lr"]) == 5e-5
    assert by_name["lr-2e-4"]["val_loss_last_high"] != by_name["lr-5e-5"]["val_loss_last_high"]
    after = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(out[later])) if row["Experiment"]}
    assert {name: row["val_loss_last_high"] for name, row in after.items()} == {
        name: row["val_loss_last_high"] for name, row in by_name.items()}

    page = (ws / "dvc_plots/index.html").read_text(encoding="utf-8")
    assert "lr-2e-4" in page and "lr-5e-5" in page
    applied = json.loads((ws / "data/eval/metrics.json").read_text(encoding="utf-8"))
    assert applied["val_loss_last_high"] == pytest.approx(float(by_name["lr-2e-4"]["val_loss_last_high"]))
    assert "lr: 0.0002" in (ws / "params.yaml").read_text(encoding="utf-8")
