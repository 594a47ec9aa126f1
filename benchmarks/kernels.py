"""Kernel throughput and peak memory: our engine vs neural-tangents' CNN kernel, same inputs, same run.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json [--sizes 16 32] [--n 8]

Every figure is measured in a fresh subprocess (so peak memory is the kernel's own), on real
PathMNIST tiles resized to each size. Timings exclude compilation (each kernel is called once on
the same shapes first). Throughput is tile pairs per second for (NNGP, NTK) together; ratios are
taken against neural-tangents' `stax` CNN kernel measured in the same run on the same inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

KERNELS = ["cnn", "cnn-c4avg", "p4cnn", "d4cnn"]


def machine() -> dict:
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem,
            "python": platform.python_version(), "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def versions() -> dict:
    out = {}
    for name in ("eqkernels", "jax", "jaxlib", "neural-tangents", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). ru_maxrss is not used: on Linux a child
    inherits its parent's maximum through fork, which would inflate small figures."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tiles(size: int, n: int, offset: int = 0):
    import numpy as np

    from eqkernels.datasets import PATHMNIST_SAMPLE
    from eqkernels.pipelines.histology import Preprocessing, load_tiles

    images = load_tiles(PATHMNIST_SAMPLE).images
    prep = Preprocessing.fit(images[:256], size)
    return np.asarray(prep(images[offset:offset + n]))


def worker(kind: str, size: int, n: int, symmetric: bool) -> dict:
    """Runs in a subprocess: one kernel, one size; returns time, pairs/s and peak RSS."""
    import jax
    import numpy as np

    x1, x2 = tiles(size, n), tiles(size, n, offset=300)
    base_rss = peak_rss_mb()
    if kind == "nt-cnn":
        from neural_tangents import stax

        from eqkernels.kernels import ConvNetSpec

        net = ConvNetSpec()
        layers = []
        for _ in range(net.depth):
            layers += [stax.Conv(net.channels, (3, 3), padding=net.padding, W_std=net.weight_std), stax.Relu()]
        layers += [stax.GlobalAvgPool(), stax.Dense(1, W_std=net.readout_weight_std)]
        kfn = jax.jit(stax.serial(*layers)[2], static_argnames=("get",))
        second = None if symmetric else x2
        jax.block_until_ready(kfn(x1, second, ("nngp", "ntk")))
        start = time.perf_counter()
        jax.block_until_ready(kfn(x1, second, ("nngp", "ntk")))
        seconds = time.perf_counter() - start
    else:
        from eqkernels.kernels import ImageKernel

        k = ImageKernel(kind, progress=False)
        second = None if symmetric else x2
        k(x1, second)
        start = time.perf_counter()
        k(x1, second)
        seconds = time.perf_counter() - start
    pairs = n * n
    return {"kernel": kind, "size": size, "n": n, "symmetric": symmetric, "pairs": pairs, "seconds": seconds,
            "pairs_per_s": pairs / seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base_rss}


def run_worker(kind: str, size: int, n: int, symmetric: bool = False, timeout: float = 1800) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--size", str(size), "--n", str(n)]
    if symmetric:
        cmd.append("--symmetric")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", EQK_PROGRESS="0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        return {"kernel": kind, "size": size, "n": n, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--n", type=int, default=8, help="tiles per side for the same-inputs comparison")
    parser.add_argument("--n-steady", type=int, default=32, help="tiles per side for our steady-state throughput")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--symmetric", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.n, args.symmetric)))
        return

    import jax

    gpu = jax.default_backend() != "cpu"
    sizes = args.sizes or ([16, 32, 64] if gpu else [16, 32])
    results = {"benchmark": "kernels", "machine": machine(), "versions": versions(),
               "architecture": "conv3x3 VALID → ReLU → conv3x3 VALID → ReLU → global average pool → Dense",
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "sizes": {}}
    for size in sizes:
        rows = {}
        if not (gpu and size > 32):
            rows["nt-cnn"] = run_worker("nt-cnn", size, args.n)
            print(json.dumps(rows["nt-cnn"]), flush=True)
        for kind in KERNELS:
            rows[kind] = run_worker(kind, size, args.n)
            print(json.dumps(rows[kind]), flush=True)
        steady = {kind: run_worker(kind, size, args.n_steady) for kind in ("cnn", "cnn-c4avg")}
        steady["cnn-symmetric"] = run_worker("cnn", size, args.n_steady, symmetric=True)
        ref = rows.get("nt-cnn", {}).get("pairs_per_s")
        ratios = {k: (v["pairs_per_s"] / ref if ref and "pairs_per_s" in v else None) for k, v in rows.items()}
        cnn = rows["cnn"].get("pairs_per_s")
        cost = {k: (cnn / v["pairs_per_s"] if cnn and "pairs_per_s" in v else None) for k, v in rows.items()}
        results["sizes"][str(size)] = {"same_inputs": rows, "speed_vs_neural_tangents_cnn": ratios,
                                       "cost_relative_to_our_cnn": cost, "steady_state": steady}
        print(json.dumps({"size": size, "speed_vs_nt": ratios, "cost_vs_cnn": cost}), flush=True)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
