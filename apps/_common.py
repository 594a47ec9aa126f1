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


# Where kernel blocks run (issue 12): the same two options on every command that computes kernels.
CLUSTER_HELP = ("Compute kernel blocks on a local Dask cluster: 'local' (one worker per core) or 'local:WORKERS' "
                "[default: in this process].")
SCHEDULER_HELP = "Compute kernel blocks on the Dask cluster whose scheduler listens at tcp://HOST:PORT."


def cluster_option():
    import typer

    return typer.Option(None, "--cluster", help=CLUSTER_HELP)


def scheduler_option():
    import typer

    return typer.Option(None, "--scheduler", help=SCHEDULER_HELP)


@contextlib.contextmanager
def kernel_executor(cluster: str | None, scheduler: str | None):
    """Yield the executor for `--cluster` / `--scheduler` (None: in-process), closed afterwards."""
    from eqkernels.blocks import executor_from_options

    executor = executor_from_options(cluster, scheduler)
    if executor is None:
        yield None
        return
    with executor:
        yield executor
