"""Cost of the stax GCNN kernels (eqkernels.layers.planar) against nt's own CNN kernel.

Architecture (both networks): conv3×3 VALID → ReLU → conv3×3 VALID → ReLU → global pool → Dense
(NTK parametrisation, ConvNetSpec defaults). The GCNN replaces the convs by LiftingConv /
GroupConv and the pool by GroupPool. Inputs: 8 × 8 tile pairs (x1 ≠ x2) cut from the bundled
NCT-CRC-HE tiles, identical for every kernel. Each kernel_fn is jit-compiled; the time is the
best of `--repeats` rounds (models interleaved) after one compiling call. Models: `cnn` (nt's
stax CNN), `C1`/`C4`/`D4` (our stax GCNN over that group; C1 is the CNN through our code) and
`engine-C4` (the fast engine, `ImageKernel("p4cnn")`, for reference). Peak memory is the peak
RSS (VmHWM) of a fresh subprocess that computes one block, also given as the increase over its
RSS after imports and input preparation.

    python benchmarks/gcnn_layers.py            # prints one JSON document
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def _tiles(size: int, n: int, offset: int) -> np.ndarray:
    """n crops of size×size×3 from the bundled NCT-CRC-HE tiles, scaled to zero mean, unit variance."""
    import tifffile

    from eqkernels.datasets import NCT_CRC_SAMPLE

    files = sorted(glob.glob(str(NCT_CRC_SAMPLE / "*" / "*.tif")))
    crops = []
    for k in range(offset, offset + n):
        image = tifffile.imread(files[k % len(files)])
        row, col = divmod((k // len(files)) % 16, 4)  # one of 16 crop positions per tile
        top, left = 20 + 45 * row, 20 + 45 * col
        crops.append(image[top:top + size, left:left + size].astype(np.float32))
    x = np.stack(crops) / 255.0
    return ((x - x.mean()) / x.std()).astype(np.float32)


def _inputs(size: int, tiles: int):
    return _tiles(size, tiles, 0), _tiles(size, tiles, 50)


def _kernel_fn(model: str):
    """A callable (x1, x2, get=...) returning an object with .nngp and .ntk."""
    import jax

    from eqkernels.kernels import ConvNetSpec, ImageKernel, KernelSpec
    from eqkernels.layers import cnn_stax, gcnn_stax

    net = ConvNetSpec()  # depth 2, 3×3 VALID, W_std √2, linear readout
    if model.startswith("engine-"):
        engine = ImageKernel(KernelSpec({"C4": "p4cnn", "D4": "d4cnn"}[model[7:]], net), progress=False)
        return lambda x1, x2, get: argparse.Namespace(**engine(x1, x2, get=get))
    fn = cnn_stax(net)[2] if model == "cnn" else gcnn_stax(net, model)[2]
    return jax.jit(fn, static_argnames="get")


def _timings(models, x1, x2, repeats: int) -> dict:
    """Best-of-`repeats` seconds per model; rounds interleave the models so that all of them see
    the same background load (the benchmark machine may be shared)."""
    import jax

    fns, row = {}, {}
    for model in models:
        fns[model] = _kernel_fn(model)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fns[model](x1, x2, get=("nngp", "ntk")))
        row[model] = {"first_call_seconds": time.perf_counter() - t0, "ntk_mean": float(np.mean(out.ntk)),
                      "times": []}
    for _ in range(repeats):
        for model in models:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[model](x1, x2, get=("nngp", "ntk")))
            row[model]["times"].append(time.perf_counter() - t0)
    pairs = x1.shape[0] * x2.shape[0]
    for model in models:
        best = min(row[model]["times"])
        row[model].update(seconds=best, pairs_per_second=pairs / best)
    return row


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM), MiB.

    Not getrusage's ru_maxrss: Linux carries that across fork/exec, so a child would report its
    parent's peak. VmHWM belongs to the address space, which exec starts afresh.
    """
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # non-Linux fallback


def _child(model: str, size: int, tiles: int) -> None:
    """Compute one block in this (fresh) process and print its peak RSS in MiB."""
    import jax

    x1, x2 = _inputs(size, tiles)
    fn = _kernel_fn(model)
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x1, x2, get=("nngp", "ntk")))
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak, "baseline_rss_mib": base, "increase_mib": peak - base,
                      "seconds_incl_compile": seconds}))


def _memory(model: str, size: int, tiles: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", model, str(size), str(tiles)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import jax
    import jaxlib
    import neural_tangents
    import numpy

    import eqkernels

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"machine": {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2 ** 20, 1),
                        "backend": jax.default_backend(), "load_average_at_start": os.getloadavg()},
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "neural_tangents": neural_tangents.__version__, "numpy": numpy.__version__,
                         "eqkernels": eqkernels.__version__}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--tiles", type=int, default=8, help="images per side of the block")
    parser.add_argument("--repeats", type=int, default=3)
    # C1 is the plain CNN evaluated by our own group layers (trivial group): the like-for-like base
    # for the |G| factor, since nt's CNN kernel uses a different (conv-based) window sum.
    parser.add_argument("--models", nargs="+", default=["cnn", "C1", "C4", "D4", "engine-C4"])
    parser.add_argument("--memory-size", type=int, default=32)
    parser.add_argument("--memory-models", nargs="+", default=["cnn", "C1", "C4"],
                        help="models whose peak memory is measured (D4 at 32 px needs about 9 GB)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SIZE", "TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    report = _machine()
    report["setup"] = {"architecture": "conv3x3 VALID -> ReLU -> conv3x3 VALID -> ReLU -> pool -> Dense(1), NTK param",
                       "block": f"{args.tiles}x{args.tiles} tile pairs, x1 != x2, RGB crops of NCT-CRC-HE tiles",
                       "timing": f"jax.jit(kernel_fn) for nngp+ntk; best of {args.repeats} interleaved rounds after a compiling call"}
    # Memory first, while this parent process is still small.
    report["peak_memory"] = {f"{model}@{args.memory_size}px": _memory(model, args.memory_size, args.tiles)
                             for model in args.memory_models}
    timings = {}
    for size in args.sizes:
        x1, x2 = _inputs(size, args.tiles)
        row = _timings(args.models, x1, x2, args.repeats)
        if "cnn" in row:
            for model in args.models:
                if model != "cnn":
                    row[model]["cost_ratio_vs_nt_cnn"] = row[model]["seconds"] / row["cnn"]["seconds"]
        if "C1" in row:
            for model in args.models:
                if model in ("C2", "C4", "D1", "D2", "D4"):
                    row[model]["cost_ratio_vs_C1_same_code"] = row[model]["seconds"] / row["C1"]["seconds"]
        timings[f"{size}px"] = row
    report["timings"] = timings
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
