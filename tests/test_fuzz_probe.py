"""Fuzzing the probe: mutated clips and images never crash the process or raise anything but MediaError.

Probing is the first code that touches a user's file, and FFmpeg's demuxers and decoders are C:
a crash there would take the whole stage (and a test run) down. The mutations run in a child
process, so a segfault or an abort shows up as the child's exit status instead of killing pytest.

CI runs a bounded number of mutations (about 15 s). For a longer run:
    WANLORA_FUZZ_CASES=5000 python -m pytest tests/test_fuzz_probe.py -q
The same mutations also go through the whole trim analysis of one file (a tenth as many).
The seed is fixed (WANLORA_FUZZ_SEED to change it), so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wanlora.media.synth import ClipSpec, clip_frames, make_clip

CASES = int(os.environ.get("WANLORA_FUZZ_CASES", "800"))
TRIM_CASES = max(1, CASES // 10)  # the whole trim analysis decodes every frame: ten times the cost
SEED = int(os.environ.get("WANLORA_FUZZ_SEED", "0"))

CHILD = r"""
import json, random, sys, traceback
from pathlib import Path
from wanlora.media.probe import MediaError, MediaInfo, probe

from wanlora.config import DatasetConfig
from wanlora.media.trim import analyse_file

seeds, out, cases, seed = [Path(p) for p in sys.argv[1].split(",")], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
whole_trim = sys.argv[5] == "trim"
ds = DatasetConfig()
rng = random.Random(seed)
tally = {"ok": 0, "media_error": 0}
unexpected = []

def mutate(data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "insert", "zero", "duplicate"])
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 24)):
            i = rng.randrange(len(b)); b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(1, len(b)):]
    elif kind == "insert":
        i = rng.randrange(len(b)); b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 512)))
    elif kind == "zero":
        i = rng.randrange(len(b)); n = rng.randint(1, 256); b[i:i + n] = bytes(len(b[i:i + n]))
    else:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2)); b[j:j] = b[i:i + 1024]
    return kind, bytes(b)

for n in range(cases):
    src = seeds[n % len(seeds)]
    kind, data = mutate(src.read_bytes())
    path = out / f"case{src.suffix}"
    path.write_bytes(data)
    try:
        if whole_trim:  # probe, trim and crop: a bad file must come back as a skipped record
            outcome = analyse_file(path, ds, {"id": "x", "dataset": "main", "path": str(path), "sha256": "", "caption_path": None})
            if outcome.problem:
                raise MediaError(outcome.problem.reason, outcome.problem.fix)
            assert outcome.record["keep_end"] > outcome.record["keep_start"] >= 0, outcome.record
        else:
            info = probe(path)
            assert isinstance(info, MediaInfo) and info.frames >= 1 and info.width > 0 and info.height > 0, info
        tally["ok"] += 1
    except MediaError as err:
        assert err.reason and err.fix
        tally["media_error"] += 1
    except Exception:
        keep = out / f"unexpected_{n}{src.suffix}"
        keep.write_bytes(data)
        unexpected.append({"case": n, "seed_file": src.name, "mutation": kind, "kept": str(keep),
                           "error": traceback.format_exc(limit=3)})
print(json.dumps({"tally": tally, "unexpected": unexpected}))
"""


def _seed_files(folder: Path) -> list[Path]:
    spec = ClipSpec(48, 32, 8.0, 10, seed=3)
    files = [folder / "seed.mp4", folder / "seed.mkv", folder / "seed.mov", folder / "seed.webm"]
    for path in files:
        make_clip(path, spec, codec="libvpx-vp9" if path.suffix == ".webm" else "mpeg4")
    frame = next(clip_frames(spec))
    Image.fromarray(frame).save(folder / "seed.png")
    Image.fromarray(frame).save(folder / "seed.jpg", quality=80)
    return [*files, folder / "seed.png", folder / "seed.jpg"]


@pytest.mark.parametrize("what, cases", [("probe", CASES), ("trim", TRIM_CASES)])
def test_mutated_media_never_crash_the_probe_or_trim(tmp_path: Path, what: str, cases: int):
    seeds = _seed_files(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(map(str, seeds)), str(work), str(cases), str(SEED), what],
        capture_output=True, text=True, timeout=max(120, cases),
    )
    assert child.returncode == 0, f"probe crashed the process (exit {child.returncode}):\n{child.stderr[-3000:]}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert not result["unexpected"], json.dumps(result["unexpected"], indent=1)
    tally = result["tally"]
    assert tally["ok"] + tally["media_error"] == cases
    # both outcomes occur: mutations that stay readable, and ones that are refused
    assert tally["ok"] > 0 and tally["media_error"] > 0, tally


def test_seed_files_probe_clean(tmp_path: Path):
    """The fuzz seeds themselves are good files: the mutations, not the seeds, cause the errors."""
    from wanlora.media.probe import probe

    for path in _seed_files(tmp_path):
        info = probe(path)
        assert (info.width, info.height) == (48, 32), path
        assert info.frames == (1 if path.suffix in (".png", ".jpg") else 10) or path.suffix in (".mkv", ".webm")


def test_a_latin1_metadata_tag_is_not_fatal(tmp_path: Path):
    """Found by this fuzzer: PyAV decodes container tags as strict UTF-8, so an old camera's
    Latin-1 title made probing raise UnicodeDecodeError and stopped the whole trim stage."""
    import av

    from wanlora.media.decode import read_frames
    from wanlora.media.probe import probe

    path = tmp_path / "latin1.mkv"
    with av.open(str(path), "w") as out:
        out.metadata["title"] = "cafeXterrace"
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in clip_frames(ClipSpec(48, 32, 8.0, 10, seed=3)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    assert data.count(b"cafeXterrace") == 1
    path.write_bytes(data.replace(b"cafeXterrace", b"caf\xe9 terrace"[:12]))
    info = probe(path)
    assert (info.width, info.height, info.frames) == (48, 32, 10)
    assert read_frames(path, [0, 9], info).shape[:3] == (2, 32, 48)


def test_a_truncated_jpeg_is_refused_by_the_probe(tmp_path: Path):
    """Found by this fuzzer: Pillow's verify() passes a JPEG whose body is cut short, so probing
    said "fine" and the trim stage died decoding it; the probe now decodes images fully."""
    from wanlora.media.probe import MediaError, probe

    good = tmp_path / "good.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, quality=80)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 6 // 10])
    with Image.open(cut) as im:
        im.verify()  # the structure check alone passes this file
    assert probe(good).kind == "image"
    with pytest.raises(MediaError, match="not a readable image.*truncated"):
        probe(cut)
