"""Stage scan: an index of the raw files with their content hashes.

Why a stage of its own: DVC cannot depend on "the videos in data/raw but not the captions beside
them". Were trim to depend on the folder, editing one caption would rerun trim and everything
after it. The index splits the folder in two files: `media.jsonl` (each clip or image and its
hash) and `captions.jsonl` (each caption file, its hash and the media file it belongs to, null
for an orphan, so the captions stage reports orphans without walking the folder again). Trim
depends on the first, captions on the second, so editing, adding or deleting a caption reruns
only this cheap hashing pass and the stages downstream of captions: which clip has a caption is
a fact of the caption chain alone, so it is recorded there and nowhere in the media chain.

The folder walk is `wanlora.media.listing.list_dataset`: links are followed only when they stay
inside the dataset folder; loops, escapes, unknown files and orphan captions are reported.
"""

from __future__ import annotations

from pathlib import Path

from wanlora.config import DatasetConfig
from wanlora.errors import UserError
from wanlora.io import sha256_file, write_jsonl
from wanlora.media.listing import list_dataset
from wanlora.report import Problem, settle, write_problems


class EmptyDataset(UserError, FileNotFoundError):
    """A dataset folder without a single clip or image: stop in the first stage, not after loading models."""


def run_stage(datasets: dict[str, DatasetConfig], workspace: Path, out_dir: Path) -> None:
    """Write out_dir/media.jsonl, out_dir/captions.jsonl and out_dir/problems.json."""
    media_rows, caption_rows = [], []
    by_dataset: dict[str, list[Problem]] = {}
    for name, ds in datasets.items():
        folder = workspace / ds.folder
        if not folder.is_dir():
            raise FileNotFoundError(
                f"dataset '{name}': folder {folder} does not exist; create it or fix datasets.{name}.folder"
            )
        listing = list_dataset(folder, ds.captions.extension, show=lambda p: p.relative_to(workspace).as_posix())
        if not listing.media:
            raise EmptyDataset(
                f"dataset '{name}': {ds.folder} holds no clip or image ({len(listing.problems)} other file(s)), so "
                f"there is nothing to train. Fix: copy your clips (.mp4, .mov, ...) with same-stem .{ds.captions.extension} "
                f"captions into {ds.folder}, then `dvc add {ds.folder}` and `dvc repro`"
            )
        problems = list(listing.problems)
        for path in listing.media:
            if path.stat().st_size == 0:
                problems.append(Problem(path.relative_to(workspace).as_posix(), "empty file (0 bytes)",
                                        "copy the file again from its source, or delete it", "scan"))
            media_rows.append({
                "id": f"{name}/{path.relative_to(folder).as_posix()}",
                "dataset": name,
                "path": path.relative_to(workspace).as_posix(),
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
            })
        pairs: list[tuple[Path | None, Path]] = [*listing.captions.items(), *((None, p) for p in listing.orphans)]
        for media, path in sorted(pairs, key=lambda pair: pair[1]):  # a caption two clips share: a row each
            caption_rows.append({
                "id": f"{name}/{path.relative_to(folder).as_posix()}",
                "dataset": name,
                "path": path.relative_to(workspace).as_posix(),
                "sha256": sha256_file(path),
                "media": media.relative_to(workspace).as_posix() if media else None,
            })
        by_dataset[name] = problems
    duplicates = duplicate_media(media_rows)  # a copy still trains: reported, never fatal
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "media.jsonl", media_rows)
    write_jsonl(out_dir / "captions.jsonl", caption_rows)
    write_problems(out_dir / "problems.json", [p for ps in by_dataset.values() for p in ps] + duplicates)
    settle(duplicates, "skip", "scan")
    for name, ds in datasets.items():  # the first stage that sees a bad file applies on_error: fail
        settle(by_dataset[name], ds.on_error, "scan")


def duplicate_media(rows: list[dict]) -> list[Problem]:
    """One report per extra copy of the same content (same sha256) under another name or in another
    dataset: every copy is trained on, so that clip is seen more often than the person thinks."""
    by_hash: dict[str, list[dict]] = {}
    for r in rows:
        if r["size"]:  # empty files share one hash and are reported as empty
            by_hash.setdefault(r["sha256"], []).append(r)
    out = []
    for copies in by_hash.values():
        first, *rest = sorted(copies, key=lambda r: r["path"])
        for r in rest:
            out.append(Problem(
                r["path"],
                f"same content as {first['path']} (sha256 {r['sha256'][:12]}): {len(copies)} copies train "
                f"{len(copies)}x as often as one clip",
                "delete the extra copy, or keep it if the repetition is meant",
                "scan",
            ))  # fmt: skip
    return out
