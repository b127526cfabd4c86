"""The stage table of a `bench/run_tier.sh` run: `python bench/tier/table.py DIR [VRAM]` (DIR holds
stages.jsonl and, on a GPU, smi.csv: the card's memory in use, sampled every 0.5 s), then what
previews cost (DIR's summary.json and previews.json, the train stage's measurements).

Why the preview share is computed, not timed: the shortened run previews once in 20 steps; the
character recipe of the VRAM tier previews every `Params.preview_every` steps (at every save), so its
share is one preview's seconds over that many steps at the run's median step time plus the preview.
"""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from wanlora.presets import make_params


def main(folder: Path, vram: int) -> None:
    rows = [json.loads(line) for line in (folder / "stages.jsonl").read_text().splitlines() if line.strip()]
    smi = []
    if (folder / "smi.csv").is_file():
        for line in (folder / "smi.csv").read_text().splitlines():
            try:
                stamp, used = (x.strip() for x in line.split(","))
                t = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
                smi.append((t, float(used.split()[0]) / 1024))
            except ValueError:
                continue
    print("| stage | wall s | peak GPU allocated GiB | peak GPU reserved GiB | card in use (nvidia-smi) GiB | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        card = [u for t, u in smi if r["start"] <= t <= r["start"] + r["wall_s"]]
        print(f"| {r['stage']} | {r['wall_s']} | {r.get('peak_alloc_gib', '-')} | {r.get('peak_reserved_gib', '-')} | "
              f"{max(card):.1f} |" if card else f"| {r['stage']} | {r['wall_s']} | {r.get('peak_alloc_gib', '-')} | "
              f"{r.get('peak_reserved_gib', '-')} | - |", f" {r['peak_rss_gib']} |")
    if (folder / "summary.json").is_file() and (folder / "previews.json").is_file():
        preview_share(folder, vram)


def preview_share(folder: Path, vram: int) -> None:
    """Each preview's time and moves, and the share of run time at the recipe's own cadence."""
    step_s = json.loads((folder / "summary.json").read_text())["step_time_s"]
    previews = json.loads((folder / "previews.json").read_text())
    every = make_params("character", vram).preview_every  # type: ignore[arg-type]
    for p in previews:
        share = p["seconds"] / (every * step_s + p["seconds"])
        print(f"preview at step {p['step']}: {p['seconds']:.1f} s ({p['switches']} expert moves); "
              f"median step {step_s:.2f} s; one preview per {every} steps (the recipe's cadence) "
              f"is {100 * share:.2f}% of run time")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 24)
