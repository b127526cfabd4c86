"""The one base class of errors a person fixes rather than a programmer.

Bad params, bad input, a stale cache, a wrong model folder, a refused LoRA file, a held lock: each
message already names the file and the fix, so stages and the CLI print it without a traceback.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message tells a person what to change."""


def rebuild_fix(stage: str) -> str:
    """The fix for a cache that a stage made from other model weights than the model has now.

    DVC does not hash the model folder (tens of GB, often outside the workspace), so weights that
    changed under the same path leave the stage "up to date" and a plain `dvc repro <stage>` does
    nothing: only a forced run of that one stage rebuilds the cache; `dvc repro` then goes on.
    """
    return f"Fix: rebuild it with `dvc repro -f -s {stage}`, then run `dvc repro`"
