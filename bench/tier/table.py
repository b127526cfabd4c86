"""The stage table of a `bench/run_tier.sh` run: `python bench/tier/table.py DIR` (DIR holds
stages.jsonl and, on a GPU, smi.csv: the card's memory in use, sampled every 0.5 s)."""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path


def main(folder: Path) -> None:
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


if __name__ == "__main__":
    main(Path(sys.argv[1]))
