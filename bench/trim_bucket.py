"""Trim + bucket time per clip on generated 720p H.264 clips of growing length (CPU).

The claim under test: trim cost does not grow with the middle of a clip, because each end is
scanned only until motion starts and bars come from a few seeked frames. Each clip has a 1 s black
intro, a 1 s frozen outro and letterbox bars (a realistic worst-ish case: both scans run, the end
scan has to seek), with 2 s keyframe spacing like phone footage.

    python bench/trim_bucket.py [--lengths 5 20 50] [--clips 3] [--repeats 3] [--workdir DIR]

Clips are generated once into --workdir and reused. Prints a Markdown table: seconds per clip
(median over clips x repeats) for hash+probe+trim+crop, wall and CPU (the CPU time of this process,
decoder threads included, is the steadier number on a shared machine), and for bucketing; and the
trimmed ranges checked against the ground truth. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from wanlora.config import BucketConfig, DatasetConfig
from wanlora.data.buckets import plan_clip
from wanlora.io import sha256_file
from wanlora.media.synth import ClipSpec, make_clip
from wanlora.media.trim import analyse_file

FPS = 24


def make_clips(workdir: Path, seconds: int, n: int) -> list[tuple[Path, dict]]:
    clips = []
    for k in range(n):
        path = workdir / f"clip_{seconds:03d}s_{k}.mp4"
        spec = ClipSpec(
            width=1280, height=720, fps=FPS, moving=FPS * (seconds - 2), intro="black", intro_frames=FPS,
            outro="frozen", outro_frames=FPS, bars=(0, 60), seed=k,
        )  # fmt: skip
        truth_path = path.with_suffix(".truth")
        if not path.exists() or not truth_path.exists():
            truth = make_clip(path, spec, codec="libx264", gop=2 * FPS)
            truth_path.write_text(f"{truth['keep_start']} {truth['keep_end']} {truth['crop']}")
        start, end = (int(v) for v in truth_path.read_text().split()[:2])
        clips.append((path, {"keep_start": start, "keep_end": end}))
    return clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[5, 20, 50])
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wanlora_bench_trim")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ds = DatasetConfig(bucket=BucketConfig(resolutions=[512], num_frames=[33, 81], frame_sampling="window", windows_per_clip=4))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, python {platform.python_version()}")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(
        "| clip length | clips | MB per clip | hash+probe+trim+crop wall s/clip | same, CPU s/clip "
        "| of which sha256 (wall s) | bucket ms/clip | kept range vs truth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seconds in args.lengths:
        t0 = time.perf_counter()
        clips = make_clips(args.workdir, seconds, args.clips)
        gen = time.perf_counter() - t0
        trim_times, cpu_times, hash_times, bucket_times, errors = [], [], [], [], []
        for path, truth in clips:
            for _ in range(args.repeats):
                start, cpu = time.perf_counter(), time.process_time()
                digest = sha256_file(path)
                hashed = time.perf_counter()
                base = {"id": f"bench/{path.name}", "dataset": "bench", "path": str(path), "sha256": digest, "caption_path": None}
                outcome = analyse_file(path, ds, base)
                done, cpu_done = time.perf_counter(), time.process_time()
                samples, problem = plan_clip(outcome.record, ds)
                bucketed = time.perf_counter()
                trim_times.append(done - start)
                cpu_times.append(cpu_done - cpu)
                hash_times.append(hashed - start)
                bucket_times.append(bucketed - done)
            rec = outcome.record
            assert rec["status"] == "ok" and problem is None and samples, (rec, problem)
            errors.append(max(abs(rec["keep_start"] - truth["keep_start"]), abs(rec["keep_end"] - truth["keep_end"])))
        mb = statistics.mean(p.stat().st_size for p, _ in clips) / 1e6
        print(
            f"| {seconds} s ({seconds * FPS} frames) | {len(clips)} | {mb:.1f} | {statistics.median(trim_times):.3f} "
            f"| {statistics.median(cpu_times):.3f} "
            f"| {statistics.median(hash_times):.3f} | {1000 * statistics.median(bucket_times):.2f} "
            f"| max {max(errors)} frames off |",
            flush=True,
        )
        if gen > 1:
            print(f"  (generated {len(clips)} clips in {gen:.0f} s)", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
