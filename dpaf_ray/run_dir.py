"""The one owner of the operator's folders and files (docs/design.md rule 18).

A run or search folder OUT is made readable by its operator alone (0700), whatever the umask and
whether the tool created it or was handed it: then nothing inside it, release/ included, is
readable by other users, even a file Ray, Tune or torch writes later with 0644. The operator
publishes by copying `release/` out. Folders below OUT that hold secrets or real-data statistics
(checkpoints, trials, evaluation, Ray Train storage) are 0700 too, and secret-bearing files 0600,
so that they stay private if the operator opens OUT itself to share its release.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO, Iterator

from .config import ConfigError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class RunDirError(ConfigError):
    """A folder the tool cannot make private (e.g. owned by another user); nothing was written."""


def private_dir(path: str | Path) -> Path:
    """Create `path` (and its parents, with the umask) if needed, and make it 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
        try:
            os.chmod(path, PRIVATE_DIR_MODE)
        except PermissionError as err:
            raise RunDirError(f"{path} cannot be made private to its operator (0700): {err.strerror}. Use a folder "
                              "you own for --out") from err
    return path


# What a folder of ours holds (a run, a search, an audit, or one of them interrupted): only such a folder, or an
# empty one, is tightened to 0700. Any other existing folder (`--out .`, `--out ~`) is refused instead of being
# closed to other users behind the operator's back.
RUN_DIR_MARKERS = frozenset({"ledger.json", "config.json", "metrics.json", "curves.png", "checkpoint", "trials",
                             "release", "release.tmp", "evaluation", "ray_train", "audit.json", "tune"})


def own_run_dir(out: str | Path) -> Path:
    """The run or search folder OUT, created or tightened to 0700 before anything is written in it."""
    out = Path(out)
    if out.is_dir() and stat.S_IMODE(out.stat().st_mode) != PRIVATE_DIR_MODE:
        names = {p.name for p in out.iterdir()}
        if names and not names & RUN_DIR_MARKERS:
            raise RunDirError(f"{out} already holds other files ({', '.join(sorted(names)[:3])}"
                              f"{', ...' if len(names) > 3 else ''}) and is not a dpaf-ray folder: its output folder "
                              "is made private to its operator (0700), which would close this one to other users. "
                              "Use a new folder for --out (e.g. runs/NAME)")
    return private_dir(out)


@contextlib.contextmanager
def private_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Write `path` atomically as a 0600 file: a temporary file created 0600 (never a moment readable
    by others) beside it, renamed over it when the block succeeds, removed when it fails."""
    path = Path(path)
    if not path.parent.exists():
        private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # an interrupted earlier write
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)  # O_CREAT's mode is masked by the umask; 0600 is never widened by it
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_private_text(path: str | Path, text: str) -> Path:
    """`path` holds `text`, written atomically, 0600."""
    with private_file(path) as f:
        f.write(text.encode())
    return Path(path)


__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "RUN_DIR_MARKERS", "RunDirError", "private_dir", "own_run_dir", "private_file",
           "write_private_text"]
