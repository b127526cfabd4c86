"""What a person watches: a rich progress bar, and dvclive metrics for `dvc plots`.

Metrics per optimizer step, in `data/train_live` (dvclive): loss_high / loss_low (loss_main for
TI2V 5B's one transformer: the main flow-matching loss of the expert that trained), dop_<expert> (the preservation term, when
DOP is on; the optimized total is their sum), lr, grad_norm (before clipping). These are functions
of the inputs, so two runs of the same inputs write the same bytes.

Measurements, in `data/train_perf/perf.json`: step_time (s), samples_per_s, peak_mem (GiB). They
differ from run to run by nature, so they live apart from what "same inputs, same bytes" covers.
`data/train_perf/summary.json` sums them up for `dvc exp show` (`perf_summary`), beside the
evaluate stage's loss summary.

dvclive appends to its .tsv files in place; it writes into the run's state folder, and every
`SUMMARY_EVERY` steps and at the end each of its files is published into `data/train_live` by an
atomic replace whose temp file lives in the state folder too (`PUBLISH_TEMP`), so a kill never
leaves a torn metrics file at a final name, nor a temp file in an out. dvclive's `next_step`
re-reads every metrics file to build its summary (and a Studio payload), which makes a long run
quadratic; we append rows with `log_metric` at an explicit step and write the summary at publish
time instead. Every logged value is a Python float (never a tensor, so no graph or device memory
is kept alive by logging). Rows logged before a resume are replayed from the checkpoint's history,
because DVC deletes the outputs before it reruns the stage.
"""

from __future__ import annotations

import math
import resource
import statistics
from pathlib import Path

import torch
from dvclive import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from wanlora.config import EXPERTS
from wanlora.io import atomic_write_json, copy_tree, sweep_temps
from wanlora.report import console

SUMMARY_EVERY = 50
METRICS = (*(f"{m}_{e}" for m in ("loss", "dop") for e in EXPERTS), "lr", "grad_norm")  # main: TI2V 5B
MEASUREMENTS = ("step_time", "samples_per_s", "peak_mem")
PUBLISH_TEMP = ".publish"  # in the run's state folder: temp files of writes into data/


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def perf_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """The run's throughput and memory: median samples/s and step time (the first steps' warm-up
    and compilation move a median little), peak memory, and the seconds spent in steps (previews
    and checkpoint saves are outside step_time: `data/train_perf/previews.json` has the former)."""
    times = [r["step_time"] for r in rows if "step_time" in r]
    rates = [r["samples_per_s"] for r in rows if math.isfinite(r.get("samples_per_s", math.nan))]
    peaks = [r["peak_mem"] for r in rows if "peak_mem" in r]
    out = {"train_s": round(sum(times), 3)} if times else {}
    if times:
        out["step_time_s"] = statistics.median(times)
    if rates:
        out["samples_per_s"] = statistics.median(rates)
    if peaks:
        out["peak_mem_gib"] = max(peaks)
    return out


class Monitor:
    """Progress bar, dvclive metrics and measurements; `log` once per optimizer step.

    `live_dir` and `perf_dir` are the train stage's outs; dvclive itself writes to `staging`, a
    folder of the run's state that no stage declares."""

    def __init__(self, live_dir: Path, perf_dir: Path, staging: Path, total: int, start: int,
                 history: list[dict[str, float]]) -> None:
        self.live_dir, self.perf_dir, self.staging = live_dir, perf_dir, staging
        self.temp = staging.parent / PUBLISH_TEMP
        sweep_temps(self.temp)
        self.live = Live(str(staging), dvcyaml=False, save_dvc_exp=False)
        self.perf: list[dict[str, float]] = []
        for row in history:
            self._write(row)
        self.last: dict[str, float] = {}
        # The ETA is the whole run's: speed over every step this process made (rich keeps the last
        # 1000), so the time of previews and expert switches counts, not just the last 30 s of steps.
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeRemainingColumn(), console=console,
                                 speed_estimate_period=float("inf"))
        self.task = self.progress.add_task("", total=total, completed=start)
        self.progress.start()

    def _write(self, row: dict[str, float]) -> None:
        self.live.step = int(row["step"])
        for name in METRICS:
            if name in row:
                self.live.log_metric(name, row[name])
        self.perf.append({"step": int(row["step"]), **{k: row[k] for k in MEASUREMENTS if k in row}})
        if self.live.step % SUMMARY_EVERY == 0:
            self.live.make_summary()
            self.publish()

    def publish(self) -> None:
        """Replace each of dvclive's files in `live_dir`, and `perf_dir`'s, atomically."""
        copy_tree(self.staging, self.live_dir, self.temp)
        atomic_write_json(self.perf_dir / "perf.json", self.perf, self.temp)
        atomic_write_json(self.perf_dir / "summary.json", perf_summary(self.perf), self.temp)

    def log(self, row: dict[str, float]) -> None:
        self._write(row)
        self.last.update({k: v for k, v in row.items() if k.startswith("loss_")})
        self.progress.update(self.task, completed=int(row["step"]), description=(
            "".join(f"{e} {self.last[f'loss_{e}']:.4f} " for e in EXPERTS if f"loss_{e}" in self.last) +
            f"{row['step_time']:.2f}s/step {row.get('samples_per_s', float('nan')):.2f} samples/s "
            f"{row['peak_mem']:.1f}GiB"))

    def close(self) -> None:
        self.progress.stop()
        self.live.end()  # writes the summary
        self.publish()
