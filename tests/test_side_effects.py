"""Importing wanlora or calling a helper changes nothing process-wide: no umask probe at import,
and helpers that build random weights leave torch's global RNG as they found it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import torch

from wanlora.models.geometry import TINY, build_transformer
from wanlora.models.tiny import tiny_text_encoder, tiny_vae


def test_importing_io_does_not_touch_the_umask_and_outputs_follow_it(tmp_path: Path):
    """io.py set the umask to 0 and back at import to learn it (another thread creating a file at
    that moment got mode 0666); now the temp file is created with 0666 and the kernel applies the
    umask, as for any other file."""
    code = (
        "import os, sys\n"
        "os.umask(0o027)\n"
        "def refuse(*a): raise AssertionError('os.umask called')\n"
        "os.umask = refuse\n"
        "from wanlora.io import atomic_write_text\n"
        "atomic_write_text(sys.argv[1], 'x')\n"
    )
    out = tmp_path / "sub" / "out.txt"
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "x" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [p.name for p in out.parent.iterdir()] == ["out.txt"]  # no temp file left behind


def test_model_builders_leave_the_global_rng_alone():
    """build_transformer and the tiny VAE / text encoder seeded torch's global RNG, so a caller's
    next draw depended on whether it had built a model; the weights are still a function of the seed."""
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    a = build_transformer(TINY, torch.float32, "cpu", 7)
    tiny_vae(3)
    tiny_text_encoder(64, 5)
    assert torch.equal(torch.rand(4), want)
    b = build_transformer(TINY, torch.float32, "cpu", 7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
