"""`eqk kernel NAME A B --out K.h5`: kernel matrices between two input sets, for inspection."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from eqkernels.apps._common import cluster_option, console, kernel_executor, scheduler_option, to_jsonable
from eqkernels.apps.histology import KernelName, PaddingName, ReadoutName
from eqkernels.errors import InputError


def kernel(
    name: KernelName = typer.Argument(..., metavar="NAME", help="Kernel family."),
    a: Path = typer.Argument(..., metavar="A", help="First input set: tile folder, MedMNIST .npz, hmnist .csv or tile."),
    b: Optional[Path] = typer.Argument(None, metavar="B", help="Second input set [default: A itself]."),
    size: int = typer.Option(28, help="Tiles are resized to size×size pixels."),
    depth: int = typer.Option(2, help="Number of 3×3 convolutions."),
    readout: ReadoutName = typer.Option("linear", help="Readout after pooling."),
    padding: PaddingName = typer.Option("VALID", help="Convolution padding."),
    limit: Optional[int] = typer.Option(None, help="Use only the first LIMIT tiles of each set."),
    out: Path = typer.Option(Path("kernel.h5"), "--out", "-o", help="HDF5 file for the matrices."),
    checkpoint: Optional[Path] = typer.Option(None, help="Folder for resumable kernel blocks (kept until the matrix is written)."),
    block_size: int = typer.Option(96, "--block-size", help="Tiles per block side (checkpoint granularity)."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help="MB for the pairs evaluated at once."),
    cluster: Optional[str] = cluster_option(),
    scheduler: Optional[str] = scheduler_option(),
):
    """Compute NNGP and NTK matrices K(A, B) with the histology pipeline's preprocessing.

    The preprocessing (per-channel standardisation) is fitted on A, as training would do.
    """
    from eqkernels import store
    from eqkernels.kernels import ConvNetSpec, ImageKernel, KernelSpec, family_kernels
    from eqkernels.pipelines.histology import Preprocessing, load_tiles

    try:
        spec = KernelSpec(name.value, ConvNetSpec(depth=depth, readout=readout.value, padding=padding.value))
        spec.net.check_input_size(size)
    except ValueError as e:
        raise InputError(str(e)) from None
    set_a = load_tiles(a)
    set_b = load_tiles(b) if b is not None else None
    if limit is not None:
        set_a = set_a.subset(range(min(limit, len(set_a))))
        set_b = set_b.subset(range(min(limit, len(set_b)))) if set_b is not None else None
    prep = Preprocessing.fit(set_a.images, size)
    xa = prep(set_a.images)
    xb = prep(set_b.images) if set_b is not None else None
    if block_size < 1:
        raise InputError(f"--block-size must be >= 1, got {block_size}")
    start = time.perf_counter()
    kern = ImageKernel(spec, block_size=block_size, memory_budget_mb=memory_budget)
    with kernel_executor(cluster, scheduler) as executor:
        rel = kern.relative(xa, xb, checkpoint=checkpoint, executor=executor)
    k = family_kernels(spec, rel)
    seconds = time.perf_counter() - start
    if rel.stats.get("blocks_resumed"):
        console.print(f"resumed {rel.stats['blocks_resumed']} of {rel.stats['blocks']} blocks from {checkpoint}")
    meta = {"kernel": json.loads(spec.to_json()), "a": str(a), "b": str(b if b is not None else a),
            "preprocessing": prep.to_dict(), "seconds": seconds,
            "a_sources": set_a.sources[:10000], "b_sources": (set_b or set_a).sources[:10000]}
    meta["blocks"] = rel.stats
    store.save(out, "kernel", to_jsonable(meta), {"nngp": k["nngp"], "ntk": k["ntk"],
                                                 "a_labels": set_a.labels, "b_labels": (set_b or set_a).labels})
    if checkpoint is not None:
        remove_checkpoint(checkpoint)
    n_pairs = k["ntk"].size
    console.print(f"{spec.name}: K({len(set_a)}×{len(set_b or set_a)}) in {seconds:.1f} s "
                  f"({n_pairs / max(seconds, 1e-9):,.0f} pairs/s) → {out}")


def remove_checkpoint(folder: Path) -> None:
    """Finished: the matrix is written, so the block checkpoints are no longer needed."""
    import shutil

    if (folder / "checkpoint.json").exists():
        shutil.rmtree(folder)
