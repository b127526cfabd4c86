"""Loaded by every Python process that has this folder on PYTHONPATH (tests/test_dvc_pipeline.py
puts it there for `dvc repro`): in stage processes, log each file opened for writing.

The log lets the test check that no stage writes a file at its final name in place (a kill would
leave it torn); wanlora.io writes `.<name>.<random>.tmp` beside it and renames. Only opens made
from Python are seen (the builtin `open` and `os.open`), which is every write wanlora makes itself.
"""

import os
import sys

_LOG = os.environ.get("WANLORA_WRITE_LOG")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

if _LOG and sys.argv and "stages" in os.path.dirname(sys.argv[0] or ""):
    _fd = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _stage = os.path.basename(sys.argv[0])

    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        if writes:
            os.write(_fd, f"{_stage}\t{os.path.abspath(os.fsdecode(path))}\n".encode())

    sys.addaudithook(_hook)
