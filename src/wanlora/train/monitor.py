"""What a person watches: a rich progress bar, and dvclive metrics for `dvc plots`.

Metrics per optimizer step: loss_high / loss_low (the main flow-matching loss of the expert that
trained), dop_high / dop_low (the preservation term, when DOP is on; the optimized total is their
sum), lr, grad_norm (before clipping), step_time (s), peak_mem (GiB).

Every logged value is a Python float (never a tensor, so no graph or device memory is kept
alive by logging). dvclive's `next_step` re-reads every metrics file to build its summary (and
a Studio payload), which makes a long run quadratic; we append rows with `log_metric` at an
explicit step and write the summary every `SUMMARY_EVERY` steps and at the end instead. The
.tsv files are dvclive's own appends, not atomic replacements: DVC recreates the folder on
every run anyway. Rows already logged before a resume are replayed from the checkpoint's
history, because DVC deletes `data/train_live` before it reruns the stage.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from dvclive import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from wanlora.report import console

SUMMARY_EVERY = 50
METRICS = ("loss_high", "loss_low", "dop_high", "dop_low", "lr", "grad_norm", "step_time", "samples_per_s", "peak_mem")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Monitor:
    """Progress bar plus dvclive `Live(dir, dvcyaml=False)`; `log` once per optimizer step."""

    def __init__(self, live_dir: Path, total: int, start: int, history: list[dict[str, float]]) -> None:
        self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
        for row in history:
            self._write(row)
        self.last = {"loss_high": float("nan"), "loss_low": float("nan")}
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("", total=total, completed=start)
        self.progress.start()

    def _write(self, row: dict[str, float]) -> None:
        self.live.step = int(row["step"])
        for name in METRICS:
            if name in row:
                self.live.log_metric(name, row[name])
        if self.live.step % SUMMARY_EVERY == 0:
            self.live.make_summary()

    def log(self, row: dict[str, float]) -> None:
        self._write(row)
        self.last.update({k: v for k, v in row.items() if k.startswith("loss_")})
        self.progress.update(self.task, completed=int(row["step"]), description=(
            f"high {self.last['loss_high']:.4f} low {self.last['loss_low']:.4f} "
            f"{row['step_time']:.2f}s/step {row.get('samples_per_s', float('nan')):.2f} samples/s "
            f"{row['peak_mem']:.1f}GiB"))

    def close(self) -> None:
        self.progress.stop()
        self.live.end()
