"""Helpers shared by the `eqk` commands: atomic output folders and consoles. The file helpers (atomic files, JSON)
live in `eqkernels.store`; `to_jsonable` is imported here for the commands that print JSON."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from eqkernels.store import to_jsonable  # noqa: F401  (re-exported: five commands use it)

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder that replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
