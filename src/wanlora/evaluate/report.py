"""The static report page: best checkpoints, checkpoints x prompts, loss curves, dataset summary.

Per expert, the fixed-noise loss on held-out clips and on training clips share one plot, with the
chosen checkpoint marked: a held-out curve that turns up while the training one keeps falling is
the LoRA memorising its clips. Without held-out clips the page says, wherever a loss appears,
that it is a training-clip loss.

One self-contained HTML file with relative links to the videos and sheets beside it: it opens
offline from the DVC cache, a zip, or a CI artefact. Plots are inline SVG drawn here (no
JavaScript, no CDN), and everything user-written (prompts, paths, problems) is escaped.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from wanlora.config import EXPERTS
from wanlora.data.split import BASIS_LABEL, HELD_OUT, TRAINING_CLIPS, Split
from wanlora.io import read_jsonl
from wanlora.report import problems_html

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


@dataclass
class ReportRow:
    """One checkpoint (or the baseline) of the grid; paths are relative to the report."""

    label: str
    step: int | None
    videos: list[str]
    posters: list[str]
    sheet: str | None
    losses: dict[str, float | None] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ plots
def _ticks(lo: float, hi: float) -> list[str]:
    """Labels of the low, middle and high tick: 3 significant digits, more when they would repeat
    (checkpoint losses often differ in the third digit)."""
    values = (lo, (lo + hi) / 2, hi)
    for digits in range(3, 9):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == 3:
            break
    return labels


def svg_plot(series: dict[str, list[tuple[float, float]]], title: str, width: int = 640, height: int = 300,
             marks: dict[str, float] | None = None) -> str:
    """A line plot as inline SVG; empty series are left out, an empty plot says so; `marks`
    draws a labelled vertical line at each x (the chosen checkpoint)."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    head = f'<svg class="plot" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" ' \
           f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
    if not pts:
        return head + f'<text x="10" y="20">{escape(title)}: no data</text></svg>'
    left, right, top, bottom = 56, 150, 24, 28
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [head, f'<text x="{left}" y="16" font-weight="bold">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>']
    for frac, ylabel, xlabel in zip((0.0, 0.5, 1.0), _ticks(y0, y1), _ticks(x0, x1)):
        yv, xv = y0 + frac * (y1 - y0), x0 + frac * (x1 - x0)
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="11">{ylabel}</text>')
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - 10}" text-anchor="middle" font-size="11">{xlabel}</text>')
    for label, xv in sorted((marks or {}).items(), key=lambda m: m[1]):
        if x0 <= xv <= x1:
            parts.append(f'<line class="mark" data-name="{escape(label)}" x1="{sx(xv):.1f}" y1="{top}" '
                         f'x2="{sx(xv):.1f}" y2="{height - bottom}" stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="4 3"/>')
            parts.append(f'<text x="{sx(xv) - 3:.1f}" y="{height - bottom - 4}" text-anchor="end" font-size="11" '
                         f'fill="#2ca02c">{escape(label)}</text>')
    for i, (name, s) in enumerate(sorted(series.items())):
        good = [(x, y) for x, y in s if math.isfinite(y)]
        if not good:
            continue
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        parts.append(f'<polyline class="series" data-name="{escape(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="1.5" points="{path}"/>')
        if len(good) < 40:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in good]
        ly = top + 14 + 16 * i
        parts.append(f'<line x1="{width - right + 10}" y1="{ly - 4}" x2="{width - right + 28}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 32}" y="{ly}" font-size="11">{escape(name)}</text>')
    return "".join(parts) + "</svg>"


def read_train_curves(live_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every dvclive metric under `<live_dir>/plots/metrics/` as (step, value) pairs."""
    curves: dict[str, list[tuple[float, float]]] = {}
    root = live_dir / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        name = path.relative_to(root).with_suffix("").as_posix()
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        column = path.stem
        curves[name] = [(float(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
    return curves


# ---------------------------------------------------------------------------------- dataset
def dataset_summary(hist: Path, clips: Path, problems: Path) -> dict[str, Any]:
    """Buckets, trimmed duration and caption problems from the bucket, trim and captions stages'
    outputs (absent: empty)."""
    import json

    out: dict[str, Any] = {"buckets": [], "clips": 0, "skipped": 0, "seconds": 0.0, "caption_problems": []}
    if hist.is_file():
        out["buckets"] = json.loads(hist.read_text(encoding="utf-8"))
    if clips.is_file():
        for c in read_jsonl(clips):
            if c.get("status") == "ok":
                out["clips"] += 1
                out["seconds"] += max(0.0, float(c.get("keep_end_s") or 0) - float(c.get("keep_start_s") or 0))
            else:
                out["skipped"] += 1
    if problems.is_file():
        out["caption_problems"] = json.loads(problems.read_text(encoding="utf-8")).get("problems", [])
    return out


# ------------------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
table.grid th.prompt{max-width:260px;font-weight:normal;font-style:italic}
table.grid video{display:block;width:256px;height:auto;background:#000;image-rendering:pixelated}
img.sheet{width:256px;display:block;margin-top:6px;image-rendering:pixelated}
svg.plot{display:inline-block;margin:0 12px 12px 0}
.best{background:#eaffea} .loss{font-size:12px;color:#555} .tag{color:#2ca02c;font-size:12px}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px}
"""


SETS = (("held_out", "held-out"), ("train", "training clips"))


def _loss_text(losses: dict[str, float]) -> str:
    parts = []
    for key, name in SETS:
        shown = [f"{e} {losses[f'{key}_{e}']:.4f}" for e in EXPERTS if f"{key}_{e}" in losses]
        if shown:
            parts.append(f"{name}: " + ", ".join(shown))
    return "; ".join(parts)


def fixed_noise_curves(rows: list[ReportRow], expert: str) -> dict[str, list[tuple[float, float]]]:
    """Training-clip and held-out loss of one expert per checkpoint (the baseline at step 0)."""
    return {name: [(float(r.step or 0), r.losses[f"{key}_{expert}"]) for r in rows if f"{key}_{expert}" in r.losses]
            for key, name in SETS}


def _best_section(split: Split, best: dict[str, dict]) -> list[str]:
    h = ['<section id="best"><h2>Best checkpoint per expert</h2>']
    if split.basis == TRAINING_CLIPS:
        h.append(f'<p class="warn" id="basis-warning">No held-out clips: {escape(split.reason)}. Every loss on '
                 "this page is on training clips, and the checkpoint below is a guess.</p>")
    elif split.basis == HELD_OUT:
        h.append(f"<p>Validation on {escape(BASIS_LABEL[split.basis])}: {escape(split.reason)} "
                 f"({escape(', '.join(split.held_out_clips))}).</p>")
    if not best:
        h.append("<p>No fixed-noise loss (sample.validation_clips is 0, or no timestep in an expert's band): "
                 "set export.step to a step number.</p>")
    else:
        h.append('<table id="best-table"><tr><th>expert</th><th>step</th><th>why</th></tr>')
        h += [f'<tr><td>{e}-noise</td><td data-best-{e}="{c["step"]}">{c["step"]}</td><td>{escape(c["reason"])}'
              "</td></tr>" for e, c in sorted(best.items())]
        h.append("</table><p><code>wanlora export</code> takes these with export.step: best; the two files may "
                 "come from different steps.</p>")
    h.append("</section>")
    return h


def render_report(
    title: str,
    prompts: list[str],
    rows: list[ReportRow],
    split: Split,
    best: dict[str, dict],
    curves: dict[str, dict[str, list[tuple[float, float]]]],
    summary: dict[str, Any],
    previews: str | None = None,
) -> str:
    """The whole page as a string (written atomically by the stage); `previews`: the relative link
    to the train stage's live page, when there is one."""
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f"<title>{escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
         # The review stage's page, beside data/eval/ in the workspace: the data this LoRA trained on.
         '<p><a id="review" href="../review/index.html">Dataset review</a>: every training sample as trained, '
         "its caption and where it came from, and every problem the data stages reported.</p>"]
    h += _best_section(split, best)

    h.append('<section id="samples"><h2>Samples</h2><table class="grid" id="grid"><thead><tr><th>checkpoint</th>')
    h += [f'<th class="prompt">{escape(p)}</th>' for p in prompts]
    h.append("</tr></thead><tbody>")
    for row in rows:
        tags = [f"best {e}" for e, c in sorted(best.items()) if c["step"] == row.step]
        cls = ' class="best"' if tags else ""
        h.append(f'<tr{cls} data-checkpoint="{escape(row.label)}"><th>{escape(row.label)}'
                 + (f' <span class="tag">{escape(", ".join(tags))}</span>' if tags else "")
                 + f'<div class="loss">{escape(_loss_text(row.losses))}</div>')
        if row.sheet:
            h.append(f'<a href="{escape(row.sheet)}"><img class="sheet" src="{escape(row.sheet)}" '
                     f'alt="contact sheet {escape(row.label)}"></a>')
        h.append("</th>")
        for video, poster in zip(row.videos, row.posters):
            h.append(f'<td><video src="{escape(video)}" poster="{escape(poster)}" controls loop muted '
                     f'playsinline preload="metadata"></video><a href="{escape(video)}">mp4</a></td>')
        h += ["<td>not sampled</td>"] * (len(prompts) - len(row.videos))
        h.append("</tr>")
    h.append("</tbody></table>")
    if previews:
        h.append('<p id="previews">The previews rendered during training (cheaper settings, the live LoRA at '
                 f'every save): <a href="{escape(previews)}">data/train_live/index.html</a>.</p>')
    h.append("</section>")

    h.append('<section id="curves"><h2>Loss</h2>')
    h.append("<p>Fixed-noise loss per expert: the same timesteps and noise at every checkpoint, on held-out "
             "clips and on as many training clips. Step 0 is the base model.</p>")
    one = any(fixed_noise_curves(rows, "main").values()) or "main" in best  # TI2V 5B: its one transformer
    for e in ("main",) if one else ("high", "low"):
        marks = {f"best {best[e]['step']}": float(best[e]["step"])} if e in best else {}
        title = ("transformer" if e == "main" else f"{e}-noise expert") + ": fixed-noise loss" + ("" if split.basis == HELD_OUT else " (training clips only)")
        h.append(svg_plot(fixed_noise_curves(rows, e), title, marks=marks))
    h += [svg_plot(series, name) for name, series in curves.items()]
    h.append("</section>")

    h.append('<section id="dataset"><h2>Dataset</h2>')
    h.append(f"<p>{summary['clips']} clip(s) kept, {summary['skipped']} skipped, "
             f"{summary['seconds']:.1f} s after trimming.</p>")
    if summary["buckets"]:
        h.append('<table id="buckets"><tr><th>bucket (WxHxF)</th><th>samples</th></tr>')
        h += [f"<tr><td>{escape(str(b.get('bucket')))}</td><td>{escape(str(b.get('count')))}</td></tr>"
              for b in summary["buckets"]]
        h.append("</table>")
    problems = summary["caption_problems"]
    h.append(f"<h3>Caption problems ({len(problems)})</h3>")
    if problems:
        h += problems_html(problems, ("path", "reason", "fix"), "caption-problems")
    h.append("</section></body></html>")
    return "\n".join(h) + "\n"
