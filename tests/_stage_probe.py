"""Run one stage's entry point and record what it really reads: params leaves, wanlora files and
workspace paths.

Used by tests/test_stage_contract.py as `python tests/_stage_probe.py STAGE OUT.json` inside a
workspace. Every params section object gets a dotted path; reading a leaf field of one (or dumping
a section whole, which reads all its leaves) is recorded. After the stage ends, the wanlora source
files in `sys.modules` are the code it imported, lazily imported modules included. An audit hook
(`sys.addaudithook`: Python's own file opens, renames and folder listings) records the workspace
paths the stage opened to read, wrote (opened to write, or renamed onto) and listed. The contract
test compares all of it with the stage's `Stage` entry in `wanlora.pipeline`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import wanlora
from wanlora.stages import _common

READ: set[str] = set()
PATHS: dict[int, str] = {}
_KEEP: list[Any] = []  # keep mapped objects alive so an id is never reused by another object
OPENED: dict[str, set[str]] = {"read": set(), "written": set(), "listed": set()}
ATOMIC_TEMP = re.compile(r"\.(.+)\.[^./]+\.tmp\Z")  # `wanlora.io.atomic_open`'s temp file beside its target
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _workspace_path(path: Any) -> str | None:
    """`path` relative to the workspace (the current folder), or None when it lies outside it."""
    if isinstance(path, int) or path is None:
        return None  # a file descriptor: its open was recorded
    full = Path(os.fsdecode(path)).absolute()
    try:
        rel = Path(os.path.normpath(full.relative_to(Path.cwd())))
    except ValueError:
        return None
    temp = ATOMIC_TEMP.match(rel.name)
    return (rel.with_name(temp.group(1)) if temp else rel).as_posix()


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        kind = "written" if (mode and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS else "read"
    elif event == "os.rename":
        path, kind = args[1], "written"
    elif event in ("os.listdir", "os.scandir"):
        path, kind = args[0], "listed"
    else:
        return
    rel = _workspace_path(path)
    if rel is not None:
        OPENED[kind].add(rel)


def _walk(node: Any, path: str) -> None:
    if isinstance(node, BaseModel):
        PATHS[id(node)] = path
        _KEEP.append(node)
        for name in type(node).model_fields:
            _walk(object.__getattribute__(node, name), f"{path}.{name}" if path else name)
    elif isinstance(node, dict) and any(isinstance(v, BaseModel) for v in node.values()):
        for key, value in node.items():
            _walk(value, f"{path}.{key}")


def _leaves(node: Any, path: str) -> list[str]:
    if isinstance(node, BaseModel):
        return [leaf for name in type(node).model_fields
                for leaf in _leaves(object.__getattribute__(node, name), f"{path}.{name}" if path else name)]
    if isinstance(node, dict) and any(isinstance(v, BaseModel) for v in node.values()):
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{path}.{key}")]
    return [path]


def _getattribute(self: BaseModel, name: str) -> Any:
    value = object.__getattribute__(self, name)
    path = PATHS.get(id(self))
    if path is not None and name in type(self).model_fields:
        child = f"{path}.{name}" if path else name
        if not isinstance(value, BaseModel | dict) or not any(
                isinstance(v, BaseModel) for v in (value.values() if isinstance(value, dict) else [value])):
            READ.add(child)
    return value


def _recording(method_name: str):
    original = getattr(BaseModel, method_name)

    def wrapper(self: BaseModel, *args: Any, **kwargs: Any) -> Any:
        path = PATHS.get(id(self))
        if path is not None:
            READ.update(_leaves(self, path))
        return original(self, *args, **kwargs)

    return wrapper


def main(stage: str, out: Path) -> None:
    real_load = _common.load_params

    def load_params(path: Path, *args: Any, **kwargs: Any):
        params = real_load(path, *args, **kwargs)
        _walk(params, "")
        return params

    _common.load_params = load_params
    BaseModel.__getattribute__ = _getattribute  # type: ignore[method-assign]
    for method in ("model_dump", "model_dump_json", "model_copy"):
        setattr(BaseModel, method, _recording(method))
    module = __import__(f"wanlora.stages.{stage}", fromlist=["main"])
    sys.addaudithook(_audit)
    code = 0
    try:
        _common.run(module.main)
    except SystemExit as err:
        code = int(err.code or 0)
    finally:
        BaseModel.__getattribute__ = object.__getattribute__  # type: ignore[method-assign]
    root = Path(wanlora.__file__).parent
    files = sorted({
        "src/wanlora/" + Path(m.__file__).resolve().relative_to(root.resolve()).as_posix()
        for m in list(sys.modules.values())
        if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(root.resolve())
    })
    paths = {kind: sorted(found) for kind, found in OPENED.items()}
    out.write_text(json.dumps({"exit": code, "read": sorted(READ), "files": files, "paths": paths}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
