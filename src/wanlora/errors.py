"""The one base class of errors a person fixes rather than a programmer.

Bad params, bad input, a stale cache, a wrong model folder, a refused LoRA file, a held lock: each
message already names the file and the fix, so stages and the CLI print it without a traceback.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message tells a person what to change."""
