"""Kernel throughput and peak memory: our engine vs neural-tangents' CNN kernel, same inputs, same run.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json [--sizes 16 32] [--n 8]

Every figure is measured in a fresh subprocess (so peak memory is the kernel's own), on real
PathMNIST tiles resized to each size. The first call compiles and is timed on its own
(`first_call_seconds`); the figure is the best of `--repeats` (≥ 5) further calls, all kept in
`seconds_all_repeats`. Throughput is tile pairs per second for (NNGP, NTK) together; ratios are
taken against neural-tangents' `stax` CNN kernel measured in the same run on the same inputs, and are
the figures to compare across machines. The JSON records the CPU model, flags, cache sizes (sysfs),
the CPUs the process may use (sched_getaffinity), XLA_FLAGS and the load average before and after
each measurement: our engine evaluates one pair at a time whose working set (`pair_working_set_bytes`:
3.6 MiB at 16 px, 29.8 MiB at 28 px, 49.6 MiB at 32 px) is compared with the L3 size there.
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


def _cpuinfo_field(name: str) -> str | None:
    """First value of `name` in /proc/cpuinfo (None if absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == name), None)
    except OSError:
        return None


def cache_sizes() -> dict:
    """CPU caches of cpu0 from sysfs: {'L1d': '48K', 'L2': '1024K', 'L3': '32768K', ...} plus who shares them."""
    out = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        def read(name):
            with open(os.path.join(root, index, name)) as f:
                return f.read().strip()
        try:
            level, kind = read("level"), read("type")
            label = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
            out[label] = {"size": read("size"), "shared_with_cpus": read("shared_cpu_list")}
        except OSError:
            continue
    return out


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine show up here (contention)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def machine() -> dict:
    """CPU model, flags, caches, the CPUs this process may run on, XLA flags, memory and load."""
    import jax

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    flags = (_cpuinfo_field("flags") or "").split()
    return {"platform": platform.platform(), "cpu": _cpuinfo_field("model name") or platform.processor(),
            "cpu_family_model_stepping": [_cpuinfo_field(k) for k in ("cpu family", "model", "stepping")],
            "cpu_mhz": _cpuinfo_field("cpu MHz"), "cores": os.cpu_count(), "affinity": affinity,
            "hypervisor": "hypervisor" in flags, "caches": cache_sizes(),
            "simd_flags": [f for f in flags if f.startswith(("avx", "fma", "sse4", "amx"))], "cpu_flags": flags,
            "xla_flags": os.environ.get("XLA_FLAGS"), "memory_mb": mem, "load_average": load_average(),
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


def _kernel_call(kind: str, x1, x2):
    """A function computing (NNGP, NTK) of `kind` between x1 and x2 (None: x1 with itself), blocking."""
    import jax

    if kind == "nt-cnn":
        from neural_tangents import stax

        from eqkernels.kernels import ConvNetSpec

        net = ConvNetSpec()
        layers = []
        for _ in range(net.depth):
            layers += [stax.Conv(net.channels, (3, 3), padding=net.padding, W_std=net.weight_std), stax.Relu()]
        layers += [stax.GlobalAvgPool(), stax.Dense(1, W_std=net.readout_weight_std)]
        kfn = jax.jit(stax.serial(*layers)[2], static_argnames=("get",))
        return lambda: jax.block_until_ready(kfn(x1, x2, ("nngp", "ntk")))
    from eqkernels.kernels import ImageKernel

    k = ImageKernel(kind, progress=False)
    return lambda: k(x1, x2)  # returns numpy arrays: finished when it returns


def worker(kind: str, size: int, n: int, symmetric: bool, repeats: int = 5) -> dict:
    """Runs in a subprocess: one kernel, one size. The first call compiles and is timed on its own; the
    figure is the best of `repeats` further calls (the least disturbed by other processes)."""
    x1, x2 = tiles(size, n), tiles(size, n, offset=300)
    base_rss = peak_rss_mb()
    load_before = load_average()
    call = _kernel_call(kind, x1, None if symmetric else x2)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    pairs = n * n
    seconds = min(times)
    return {"kernel": kind, "size": size, "n": n, "symmetric": symmetric, "pairs": pairs, "seconds": seconds,
            "pairs_per_s": pairs / seconds, "seconds_all_repeats": times, "first_call_seconds": first,
            "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base_rss, "load_average_before": load_before,
            "load_average_after": load_average()}


def run_worker(kind: str, size: int, n: int, symmetric: bool = False, timeout: float = 1800, repeats: int = 5) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--size", str(size), "--n", str(n), "--repeats", str(repeats)]
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
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the compiling one (best is kept, >= 5)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--symmetric", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.n, args.symmetric, args.repeats)))
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
            rows["nt-cnn"] = run_worker("nt-cnn", size, args.n, repeats=args.repeats)
            print(json.dumps(rows["nt-cnn"]), flush=True)
        for kind in KERNELS:
            rows[kind] = run_worker(kind, size, args.n, repeats=args.repeats)
            print(json.dumps(rows[kind]), flush=True)
        steady = {kind: run_worker(kind, size, args.n_steady, repeats=args.repeats) for kind in ("cnn", "cnn-c4avg")}
        steady["cnn-symmetric"] = run_worker("cnn", size, args.n_steady, symmetric=True, repeats=args.repeats)
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
