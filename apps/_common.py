"""Helpers shared by the `eqk` commands: atomic outputs, consoles, JSON."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

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


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary file path that replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def to_jsonable(obj):
    """numpy scalars/arrays → Python numbers/lists, NaN → None, recursively."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


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
