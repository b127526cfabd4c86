"""Setting up a workspace: git + DVC initialised, dvc.yaml and stages/ written, scratch ignored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from wanlora.config import Params
from wanlora.io import atomic_write_text
from wanlora.pipeline import is_repo_checkout, sync

GITIGNORE = "/scratch/\n/models/\n__pycache__/\n"


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout}{result.stderr}")


def prepare(workspace: Path, params: Params, own_repo: bool = False) -> None:
    """Make `workspace` runnable with `dvc repro`; idempotent, never touches data/raw.

    Inside an existing git repository the workspace becomes a DVC sub-project of it, unless
    `own_repo` (the demo: a self-contained repository that can be pushed, cloned and audited).
    """
    workspace.mkdir(parents=True, exist_ok=True)
    inside_git = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=workspace,
                                capture_output=True, text=True).returncode == 0
    if (own_repo or not inside_git) and not (workspace / ".git").exists():
        _run(["git", "init", "-q"], workspace)
        inside_git = False
    if not (workspace / ".dvc").exists():
        # a workspace inside a larger git repository becomes a DVC sub-project of it
        subdir = ["--subdir"] if inside_git and not (workspace / ".git").exists() else []
        _run([sys.executable, "-m", "dvc", "init", "-q", *subdir], workspace)
        _run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], workspace)
    gitignore = workspace / ".gitignore"
    if not gitignore.exists():
        atomic_write_text(gitignore, GITIGNORE)
    for ds in params.datasets.values():
        (workspace / ds.folder).mkdir(parents=True, exist_ok=True)
    sync(workspace, params, in_repo=is_repo_checkout(workspace))


def track_raw(workspace: Path, params: Params) -> None:
    """`dvc add` every dataset folder, so the exact clips behind a LoRA can be pushed and pulled.

    Refuses folders holding symlinks: DVC follows them (a loop crashes it, and a link out of the
    folder is replaced by a copy of its target, which would modify the raw data we promise to keep).
    """
    from wanlora.media.listing import list_dataset

    links = [p for ds in params.datasets.values()
             for p in list_dataset(workspace / ds.folder, ds.captions.extension).problems if "link" in p.reason]
    if links:
        listing = "\n".join("  " + p.line() for p in links)
        raise ValueError(f"cannot track the raw data with DVC while it holds symlinks:\n{listing}")
    folders = sorted({ds.folder for ds in params.datasets.values()})
    _run([sys.executable, "-m", "dvc", "add", "-q", *folders], workspace)


def commit(workspace: Path, message: str) -> None:
    """Commit the workspace's pipeline files; dvclive and lineage need a git revision to point at."""
    _run(["git", "add", "-A"], workspace)
    _run(["git", "-c", "user.name=wanlora", "-c", "user.email=wanlora@localhost", "commit", "-q",
          "--allow-empty", "-m", message], workspace)
