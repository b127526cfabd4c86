"""Atomic writes, content hashes and JSON Lines manifests.

Every file a stage writes goes through here: written to a temporary file in the same folder,
flushed to disk, then renamed into place. A kill at any moment leaves either the previous good
file or the new one, never a torn one, and DVC's read-only cache links are replaced rather than
opened for update.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from wanlora.errors import UserError

HASH_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", temp_dir: str | Path | None = None) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` (or in `temp_dir`); on clean exit fsync and rename it over `path`.

    On an exception (disk full included) the temp file is removed and `path` is untouched. A
    SIGKILL leaves the temp file where it was made: a writer that publishes into a DVC out while a
    stage runs passes a `temp_dir` of its own state (same filesystem, so the rename stays atomic),
    and the out only ever holds whole files at final names.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = Path(temp_dir) if temp_dir is not None else path.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path, where)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _new_temp(path: Path, where: Path) -> tuple[int, Path]:
    """A new `.<name>.<random>.tmp` in `where`, created with mode 0666 less the umask, as any
    other output is (`tempfile.mkstemp` makes 0600, and reading the umask means setting it)."""
    while True:
        tmp = where / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes, temp_dir: str | Path | None = None) -> None:
    with atomic_open(path, "wb", temp_dir) as f:
        f.write(data)


def copy_tree(src: str | Path, dst: str | Path, temp_dir: str | Path | None = None) -> None:
    """Copy every file under `src` to the same place under `dst`, each by an atomic write (a kill
    leaves each file whole or absent, never torn: `shutil.copytree` writes final names in place).
    Temp files that a killed write left in `src` are not copied; files `dst` already holds with the
    same bytes are left alone; `temp_dir` as in `atomic_open`."""
    src, dst = Path(src), Path(dst)
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not _is_temp(p.name)):
        target, data = dst / path.relative_to(src), path.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data, temp_dir)


def _is_temp(name: str) -> bool:
    """`atomic_open`'s temp file names: `.<target name>.<random>.tmp`."""
    return name.startswith(".") and name.endswith(".tmp")


def sweep_temps(temp_dir: str | Path) -> None:
    """Remove the temp files writers killed mid-write left in `temp_dir`, a folder only one
    process writes (`atomic_open`'s temp_dir, swept when that process starts)."""
    for stale in Path(temp_dir).glob(".*.tmp"):
        stale.unlink()


def atomic_write_text(path: str | Path, text: str, temp_dir: str | Path | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), temp_dir)


def atomic_write_json(path: str | Path, obj: Any, temp_dir: str | Path | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", temp_dir)


def atomic_write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100))


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]], key: str = "id") -> None:
    """Write records sorted by `key`, one compact JSON object a line, atomically.

    Sorting and stable key order make the file a pure function of its content, so DVC sees a
    change only when a record really changed.
    """
    rows = sorted(records, key=lambda r: str(r[key]))
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a manifest; a malformed line names the file and line number."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err}); rerun the stage that writes it") from None
    return out


class ManifestPathError(UserError):
    """A manifest names a file outside its dataset folder: edited, or swapped on a shared remote."""


def dataset_file(workspace: str | Path, folder: str | Path, rel: str, where: str) -> Path:
    """`rel`, a path read from a manifest (relative to the workspace, or absolute when the dataset
    folder lies elsewhere), as a path, refused unless it resolves inside the dataset `folder`.

    Our stages only ever write paths inside the folder (the listing follows a link only when its
    target stays inside), so anything else was put there by hand or by whoever could write the
    DVC remote, e.g. `~/.netrc`, whose text the captions stage would otherwise copy into
    captions.jsonl and push. `where` names the manifest and record for the message."""
    path = Path(workspace) / rel
    root = (Path(workspace) / folder).resolve()
    if not path.resolve().is_relative_to(root):
        raise ManifestPathError(
            f"{where}: path {str(rel)[:200]!r} lies outside its dataset folder {folder}; wanlora never writes "
            "such a path, so the manifest was edited or replaced (a shared DVC remote?). Fix: rebuild it from "
            "the raw data (`dvc repro --force <the stage that writes it>`), and set `verify: true` on DVC "
            "remotes others can write"
        )
    return path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (clips can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able value in canonical form (sorted keys), for config and cache keys."""
    return sha256_text(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
