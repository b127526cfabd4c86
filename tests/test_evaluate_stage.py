"""The evaluate stage on the tiny model: videos, contact sheets, metrics, report, reruns."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from _helpers import add_checkpoint, make_eval_workspace
from wanlora.config import load_params
from wanlora.evaluate import sampling, stage
from wanlora.evaluate.stage import run_stage
from wanlora.pipeline import BEST, LORA
from wanlora.stages.evaluate import inputs


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    ws = make_eval_workspace(tmp_path_factory.mktemp("eval"))
    params = load_params(ws / "params.yaml")
    run_stage(params, ws, inputs(ws), ws / "data/eval")
    return ws, params, ws / "data/eval"


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_videos_have_the_requested_frames_and_size(evaluated):
    _, _, out = evaluated
    dirs = sorted(p.name for p in (out / "samples").iterdir())
    assert dirs == ["baseline", "step_000004"]  # every 2nd checkpoint (and the last): step 2 skipped
    for d in dirs:
        for i in range(2):
            frames = _decode(out / "samples" / d / f"prompt_{i:02d}.mp4")
            assert frames.shape == (5, 32, 32, 3)
    base, lora = _decode(out / "samples/baseline/prompt_00.mp4"), _decode(out / "samples/step_000004/prompt_00.mp4")
    assert np.abs(base.astype(int) - lora.astype(int)).mean() > 1.0  # the LoRA changed the video


def test_contact_sheet_is_prompts_by_frames(evaluated):
    _, _, out = evaluated
    sheet = np.asarray(Image.open(out / "samples/step_000004/contact_sheet.png"))
    assert sheet.shape == (2 * 32, 5 * 32, 3)  # 2 prompts x 5 frames of 32x32
    first = _decode(out / "samples/step_000004/prompt_00.mp4")[0]
    assert np.abs(sheet[:32, :32].astype(int) - first.astype(int)).mean() < 12  # mp4 is lossy
    assert np.abs(sheet[:32].astype(int) - sheet[32:].astype(int)).mean() > 1.0  # two different prompts


def test_metrics_and_validation_rows(evaluated):
    ws, _, out = evaluated
    split = json.loads((ws / "data/split/validation.json").read_text())
    assert split["basis"] == "held_out" and len(split["held_out_clips"]) == 1  # one clip in five
    assert split["validation_samples"] == [split["held_out_clips"][0] + "#0"]
    assert len(split["training_samples"]) == 1 and split["training_samples"] != split["validation_samples"]
    rows = {r["step"]: r for r in json.loads((out / "val_loss.json").read_text())}
    assert sorted(rows) == [0, 2, 4]  # the baseline is step 0
    keys = ["held_out_high", "held_out_low", "train_high", "train_low"]
    for r in rows.values():
        assert sorted(k for k in r if k != "step") == keys
        assert r["held_out_high"] != r["train_high"]  # two different clips at the same noise
    assert rows[2]["held_out_high"] != rows[0]["held_out_high"]
    best = json.loads((out / "best.json").read_text())
    assert best["basis"] == "held_out" and best["held_out_clips"] == split["held_out_clips"]
    for e in ("high", "low"):
        c = best["experts"][e]
        assert c["lowest_step"] == min((2, 4), key=lambda s: (rows[s][f"held_out_{e}"], s))
        assert c["step"] <= c["lowest_step"] and c["loss"] == pytest.approx(rows[c["step"]][f"held_out_{e}"])
        assert c["noise"] > 0 and f"step {c['step']}" in c["reason"]


def test_metrics_are_a_flat_summary_with_no_step_in_a_key(evaluated):
    """metrics.json is one row of scalars for `dvc exp show`: best step and held-out loss at the
    best and at the last checkpoint per expert (val_loss.json's rows), the trainer's final loss
    smoothed; no key names a checkpoint, so runs saved at other steps share every column."""
    ws, _, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["step"]: r for r in json.loads((out / "val_loss.json").read_text())}
    best = json.loads((out / "best.json").read_text())["experts"]
    assert not any(re.search(r"\d", k) for k in metrics)
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    assert metrics["basis"] == "held_out" and metrics["held_out_clips"] == 1 and metrics["last_step"] == 4
    for e in ("high", "low"):
        assert metrics[f"best_step_{e}"] == best[e]["step"]
        assert metrics[f"val_loss_best_{e}"] == rows[best[e]["step"]][f"held_out_{e}"]
        assert metrics[f"val_loss_last_{e}"] == rows[4][f"held_out_{e}"]
        losses = [v for _, v in stage.read_train_curves(ws / "data/train_live")[f"loss_{e}"]]
        weights = [0.9 ** (len(losses) - 1 - i) for i in range(len(losses))]  # the debiased EMA, in closed form
        assert metrics[f"train_loss_smoothed_{e}"] == pytest.approx(
            sum(w * v for w, v in zip(weights, losses)) / sum(weights))


class _Grid(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.cells, self.videos, self.series, self.marks, self.best = [], {}, [], [], [], {}
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-checkpoint" in a:
            self._row = a["data-checkpoint"]
            self.rows.append(self._row)
            self.cells[self._row] = 0
        elif tag == "td" and self._row:
            self.cells[self._row] += 1
        elif tag == "video":
            self.videos.append((self._row, a["src"], a["poster"]))
        elif tag == "polyline":
            self.series.append(a["data-name"])
        elif tag == "line" and a.get("class") == "mark":
            self.marks.append(a["data-name"])
        for e in ("high", "low"):
            if f"data-best-{e}" in a:
                self.best[e] = int(a[f"data-best-{e}"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None


def test_report_page_has_the_grid_curves_and_dataset(evaluated):
    _, _, out = evaluated
    html = (out / "report.html").read_text()
    grid = _Grid()
    grid.feed(html)
    assert grid.rows == ["baseline", "step 2", "step 4"]
    assert grid.cells == {"baseline": 2, "step 2": 2, "step 4": 2}
    assert [(r, v) for r, v, _ in grid.videos] == [
        ("baseline", "samples/baseline/prompt_00.mp4"), ("baseline", "samples/baseline/prompt_01.mp4"),
        ("step 4", "samples/step_000004/prompt_00.mp4"), ("step 4", "samples/step_000004/prompt_01.mp4")]
    assert all((out / v).is_file() and (out / p).is_file() for _, v, p in grid.videos)  # relative links
    assert html.count("not sampled") == 2
    best = {e: c["step"] for e, c in json.loads((out / "best.json").read_text())["experts"].items()}
    assert grid.best == best
    # per expert, training-clip and held-out loss in one plot, the chosen step marked; then the
    # trainer's curves, lr on its own scale
    assert grid.series == ["held-out", "training clips"] * 2 + ["loss_high", "loss_low", "lr"]
    assert grid.marks == [f"best {best['high']}", f"best {best['low']}"]
    labels = ["high-noise expert: fixed-noise loss", "low-noise expert: fixed-noise loss",
              "training loss (per step, random noise)", "lr"]
    assert [html.index(f'aria-label="{label}"') for label in labels] == sorted(
        html.index(f'aria-label="{label}"') for label in labels)
    assert "basis-warning" not in html and "main/c" in html  # the held-out clip is named
    assert "sks walking" in html and "32x32x5" in html and "5 clip(s) kept, 0 skipped, 3.8 s" in html
    assert "no caption &lt;file&gt;" in html  # user text is escaped
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # offline


def test_rerun_samples_nothing_and_a_new_checkpoint_only_itself(evaluated, monkeypatch):
    ws, params, out = evaluated
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    shutil.rmtree(out)  # DVC deletes outs before rerunning a stage

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every result was cached")

    monkeypatch.setattr(stage, "load_models", no_model)
    run_stage(params, ws, inputs(ws), out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    monkeypatch.undo()

    calls = {"generate": 0, "val": 0}
    real_generate, real_val = sampling.generate, stage.fixed_noise_losses

    def counting_generate(*a, **k):
        calls["generate"] += 1
        return real_generate(*a, **k)

    def counting_val(*a, **k):
        calls["val"] += 1
        return real_val(*a, **k)

    monkeypatch.setattr(sampling, "generate", counting_generate)
    monkeypatch.setattr(stage, "fixed_noise_losses", counting_val)
    add_checkpoint(ws, 6)
    try:
        run_stage(params, ws, inputs(ws), out)
    finally:
        for e in ("high", "low"):
            (ws / f"data/lora/{e}/step_000006.safetensors").unlink()
    assert calls == {"generate": 1, "val": 2}  # held-out and training clips
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["baseline", "step_000004", "step_000006"]
    assert (out / "samples/step_000004/prompt_00.mp4").read_bytes() == before[Path("samples/step_000004/prompt_00.mp4")]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed")
def test_report_screenshot_is_not_blank(evaluated, tmp_path):
    _, _, out = evaluated
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", (out / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    img = np.asarray(Image.open(shot).convert("L")).astype(float)
    assert img.std() > 10  # text, tables, contact sheets and plots: not a blank page
    assert (img < 128).mean() > 0.01


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed")
def test_both_fixed_noise_curves_render_in_chromium(evaluated, tmp_path):
    """The page's loss section as Chromium draws it: per expert the held-out curve (first palette
    colour) and the training-clip curve (second), and the dashed best marker (green). Each plot is
    rendered alone because the sample videos' random pixels hold every colour."""
    from wanlora.evaluate.report import PALETTE

    _, _, out = evaluated
    html = (out / "report.html").read_text()
    head, curves = html.split("<body>", 1)[0], html.split('<section id="curves">', 1)[1].split("</section>", 1)[0]
    plots = re.findall(r"<svg.*?</svg>", curves, re.S)[:2]  # the high- and low-noise fixed-noise plots
    assert [re.search(r'aria-label="([^"]*)"', p)[1] for p in plots] == [
        "high-noise expert: fixed-noise loss", "low-noise expert: fixed-noise loss"]

    def pixels(area: np.ndarray, color: str) -> int:
        want = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(area - want).sum(axis=2) < 40).sum())

    for i, plot in enumerate(plots):
        page, shot = tmp_path / f"plot{i}.html", tmp_path / f"plot{i}.png"
        page.write_text(f"{head}<body>{plot}</body></html>")
        subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=700,340", page.as_uri()], check=True, timeout=120, capture_output=True)
        rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        assert pixels(rgb, PALETTE[0]) > 100 and pixels(rgb, PALETTE[1]) > 100  # two curves
        assert pixels(rgb, PALETTE[2]) > 10  # the best marker and its label


def test_too_few_clips_fall_back_to_a_training_clip_loss_labelled_everywhere(tmp_path):
    """Three clips cannot spare one (at most one in five is held out): the loss is on training
    clips, and metrics, best.json, the report, export.json and the export header all say so."""
    from wanlora.export.stage import run_stage as export
    from wanlora.tensorfiles import read_header

    ws = make_eval_workspace(tmp_path, steps=(2, 4), n_clips=3)
    params = load_params(ws / "params.yaml")
    params.sample.prompts, params.sample.baseline = [], False
    run_stage(params, ws, inputs(ws), ws / "data/eval")
    out = ws / "data/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["basis"] == "training_clips" and metrics["held_out_clips"] == 0
    rows = json.loads((out / "val_loss.json").read_text())
    assert [r["step"] for r in rows] == [0, 2, 4] and rows[1]["held_out_high"] is None
    assert metrics["val_loss_last_high"] == rows[2]["train_high"]  # the summary's basis: training clips
    best = json.loads((out / "best.json").read_text())
    assert best["basis"] == "training_clips" and "too few to spare one" in best["split"]
    assert all("training-clip loss" in c["reason"] for c in best["experts"].values())
    html = (out / "report.html").read_text()
    assert 'id="basis-warning"' in html and "Every loss on this page is on training clips" in html
    assert "fixed-noise loss (training clips only)" in html and "held-out:" not in html
    export(params, ws / LORA, ws / BEST, ws / "data/exports")
    summary = json.loads((ws / "data/exports/export.json").read_text())
    assert {p["basis"] for p in summary["experts"].values()} == {"training_clips"}
    _, meta = read_header(next((ws / "data/exports/comfyui").glob("*_high_noise.safetensors")))
    assert json.loads(meta["wanlora.export_choice"])["basis"] == "training_clips"
