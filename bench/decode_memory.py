"""Peak memory of making one latent-cache sample from a huge clip (issue 22).

Writes an 8192x8192 H.264 clip (9 frames, 8 fps), then in a fresh process per repeat runs
`wanlora.models.latents.load_frames` for a 9-frame 64x64 sample of the whole frame and prints the
growth of the peak RSS (VmHWM) over the process's baseline after imports.

    python bench/decode_memory.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

MEASURE = """
import json, re, sys, time
from pathlib import Path
from wanlora.models.latents import load_frames
def hwm():  # VmHWM: ru_maxrss would carry the forking parent's size over exec
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
sample = {"id": "d/big.mp4#0", "path": "big.mp4", "frame_indices": list(range(9)), "num_frames": 9,
          "crop": [0, 0, 8192, 8192], "width": 64, "height": 64, "flip": False}
base = hwm()
t = time.perf_counter()
load_frames(sample, Path(sys.argv[1]))
print(json.dumps({"mib": (hwm() - base) / 1024, "s": time.perf_counter() - t}))
"""


def write_clip(path: Path, side: int = 8192, frames: int = 9) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = side
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast", "crf": "40"}
        rgb = np.zeros((side, side, 3), np.uint8)
        rgb[:, :, 0] = (np.arange(side) % 256).astype(np.uint8)[None, :]
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        for t in range(frames):
            frame.pts = t
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_clip(Path(tmp) / "big.mp4")
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", MEASURE, tmp], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        size = (Path(tmp) / "big.mp4").stat().st_size
    mib, secs = [r["mib"] for r in runs], [r["s"] for r in runs]
    print(f"clip {size / 1024:.0f} KiB; peak RSS growth MiB: {', '.join(f'{m:.0f}' for m in mib)} "
          f"(median {statistics.median(mib):.0f}); seconds: {', '.join(f'{s:.1f}' for s in secs)}")


if __name__ == "__main__":
    main()
