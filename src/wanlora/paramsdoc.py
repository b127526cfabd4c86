"""The README's params reference, generated from the schema so the two cannot disagree.

`python -m wanlora.paramsdoc README.md` rewrites the block between the markers; a test fails when
the README is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from wanlora.config import DatasetConfig, Params

START, END = "<!-- params:start -->", "<!-- params:end -->"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key + ".")
        elif name == "datasets":
            rows += _rows(DatasetConfig, key + ".<name>.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append(f"| `{key}` | `{json.dumps(default)}` | {field.description or ''} |")
    return rows


def markdown() -> str:
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *_rows(Params, "")])


def update(readme: Path) -> bool:
    """Rewrite the params block of `readme`; True when it changed."""
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{markdown()}\n{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    update(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
