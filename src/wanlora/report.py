"""Bad input: one record shape for every problem, and the skip-or-stop policy.

A problem names the file, what is wrong and what the person should do. Stages collect problems,
write them as an output (so the report is versioned with the data), and either continue without
the bad item (`on_error: skip`) or stop with every problem listed (`on_error: fail`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape

from wanlora.errors import UserError
from wanlora.io import atomic_write_json

#: The one console every stage and library module prints progress and warnings on (stderr: stdout
#: stays for what a command returns, `wanlora.cli`).
console = Console(stderr=True)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    fix: str
    stage: str = ""

    def line(self) -> str:
        return f"{self.path}: {self.reason}. Fix: {self.fix}"


class InputError(UserError, RuntimeError):
    """Raised when a stage stops on bad input; its message lists every problem."""


def settle(problems: list[Problem], on_error: Literal["skip", "fail"], stage: str) -> None:
    """Print problems; raise InputError if the dataset policy says bad input stops the stage."""
    for p in problems:
        console.print(f"[yellow]{stage}: skipped[/] {escape(p.line())}")
    if problems and on_error == "fail":
        listing = "\n".join("  " + p.line() for p in problems)
        raise InputError(
            f"{stage}: {len(problems)} bad input(s), and on_error is 'fail':\n{listing}\n"
            "Fix them, or set datasets.<name>.on_error: skip to train without them."
        )


def write_problems(path: str | Path, problems: list[Problem]) -> None:
    """The problems report, an output of the stage; sorted so reruns write identical bytes."""
    rows = sorted((asdict(p) for p in problems), key=lambda r: (r["path"], r["reason"]))
    atomic_write_json(path, {"count": len(rows), "problems": rows})


_HEADINGS = {"path": "file", "stage": "stage", "reason": "problem", "fix": "fix"}


def problems_html(problems: list[dict], columns: Sequence[str], table_id: str) -> list[str]:
    """Problem records (as problems.json stores them) as the lines of an HTML table, one column per
    key: the review page and the evaluate report show the same reports the same way."""
    h = [f'<table id="{table_id}"><tr>' + "".join(f"<th>{_HEADINGS[c]}</th>" for c in columns) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(str(p.get(c, '')))}</td>" for c in columns) + "</tr>" for p in problems]
    h.append("</table>")
    return h
