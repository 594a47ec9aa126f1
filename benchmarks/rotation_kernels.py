"""Cost of the interpolated-rotation kernels relative to `cnn`, measured in one process on the same tiles.

    python benchmarks/rotation_kernels.py --out benchmarks/results/rotation_kernels.json [--sizes 8 16]

Each kernel is called once on the shapes (compilation), then timed `--repeats` times; the best
time counts (the machine is shared). Cross kernels K(x1, x2) between n real PathMNIST tiles and n
others. Expected cost over `cnn`: |G|/|H| squared times |H| pair evaluations (C8: 16, C16: 64,
D8: 32, D16: 128; C4: 4) plus the interpolation itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import machine, tiles, versions  # noqa: E402  (the kernel benchmark's helpers)
from rotation_reproduction import cpu_flags  # noqa: E402

KERNELS = ["cnn", "cnn-c4avg", "cnn-c8avg", "cnn-c16avg", "cnn-d4avg", "cnn-d8avg", "cnn-d16avg"]


def best_seconds(fn, repeats: int) -> float:
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(size: int, n: int, repeats: int) -> list[dict]:
    from eqkernels.kernels import ImageKernel

    x1, x2 = tiles(size, n), tiles(size, n, offset=300)
    rows = []
    for name in KERNELS:
        kernel = ImageKernel(name, progress=False)
        seconds = best_seconds(lambda: kernel(x1, x2), repeats)
        rows.append({"kernel": name, "size": size, "n": n, "seconds": seconds, "tile_pairs_per_s": n * n / seconds})
    base = rows[0]["seconds"]
    for row in rows:
        row["cost_vs_cnn"] = row["seconds"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [row for size in args.sizes for row in measure(size, args.n, args.repeats)]
    doc = {"benchmark": "rotation_kernels", "command": " ".join(sys.argv), "machine": machine(),
           "cpu_flags": cpu_flags(), "versions": versions(), "note": "best of --repeats after compilation; "
           "ratios within one run (shared machine)", "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    for row in rows:
        print(f"{row['size']:>3} px {row['kernel']:<11} {row['tile_pairs_per_s']:>9.1f} tile pairs/s  "
              f"×{row['cost_vs_cnn']:.1f} the cost of cnn")


if __name__ == "__main__":
    main()
