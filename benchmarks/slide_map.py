"""Slide-map throughput: tiles/s of `eqk histology map`'s pipeline against the kernel engine alone, same run.

    python benchmarks/slide_map.py --out benchmarks/results/slide_map.json [--kernels d4cnn] [--n-train 350]

At the demo's kernel and size by default (d4cnn, 16 px, 350 training tiles of the bundled PathMNIST
sample). Prediction cost does not depend on the model's coefficients, so the model here has
placeholder dual coefficients (zeros) and an identity posterior factor instead of a fit (which
would cost 4·N² kernel pairs): the figures are throughput only, not accuracy. The slide is the
assembled test slide of bundled NCT tiles repeated 2 × 2 (32 tissue tiles). Each repetition maps
it from scratch (fresh checkpoint); the peer is `relative_kernels` on the same preprocessed tiles
and training tiles (the pairs the map needs), so the ratio is the map's overhead (reading, tissue
detection, resizing, checkpoints). Best of `--repeats` after one compiling run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import machine, versions  # noqa: E402


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that XLA's CPU code uses."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx")))


def placeholder_model(kernel: str, n_train: int, size: int):
    """A HistologyModel on real PathMNIST training tiles with zero coefficients (prediction cost only)."""
    from eqkernels.datasets import PATHMNIST_SAMPLE
    from eqkernels.kernels import KernelSpec
    from eqkernels.pipelines.histology import Preprocessing, load_tiles
    from eqkernels.pipelines.histology_map import known_training_resolution
    from eqkernels.pipelines.histology_model import HistologyModel

    tiles = load_tiles(PATHMNIST_SAMPLE)
    train = tiles.subset(np.arange(n_train))
    prep = Preprocessing.fit(train.images, size)
    options = {"train_mpp": known_training_resolution(PATHMNIST_SAMPLE, 28), "train_tile_px": 28}
    return HistologyModel(KernelSpec(kernel), prep, list(tiles.class_names), prep(train.images), train.labels,
                          train.fingerprints(), np.zeros((n_train, len(tiles.class_names))), np.eye(n_train), options)


def big_slide(folder: Path) -> Path:
    """The assembled test slide repeated 2 × 2 (1344 × 1792 px at 0.5 µm/px)."""
    import tifffile

    from eqkernels.pipelines.histology_map import NCT_MPP, assemble_test_slide
    from eqkernels.slides import write_pyramidal_tiff

    small = folder / "small.tif"
    assemble_test_slide(small)
    image = np.tile(tifffile.imread(small), (2, 2, 1))
    return write_pyramidal_tiff(image, folder / "slide.tif", NCT_MPP, levels=3)


def measure(kernel: str, n_train: int, size: int, repeats: int, folder: Path) -> dict:
    from eqkernels.groups import get_group
    from eqkernels.kernels.relative import relative_kernels
    from eqkernels.pipelines.histology_map import kernel_model_predictor, map_slide, read_tiles
    from eqkernels.slides import open_slide

    model = placeholder_model(kernel, n_train, size)
    predictor = kernel_model_predictor(model)
    path = big_slide(folder)
    map_times, engine_times = [], []
    with open_slide(path) as slide:
        for _ in range(repeats + 1):  # the first run compiles
            shutil.rmtree(folder / "ckpt", ignore_errors=True)
            t0 = time.perf_counter()
            result = map_slide(predictor, slide, folder / "ckpt", progress=False)
            map_times.append(time.perf_counter() - t0)
        inputs = model.preprocessing(read_tiles(slide, result.grid, result.tiles))
    group = get_group(model.spec.group or "C1")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        rel = relative_kernels(model.spec.net, inputs, model.train_inputs, group, need_self=True, need_self2=False,
                               progress=False)
        engine_times.append(time.perf_counter() - t0)
    n = len(result.tiles)
    best_map, best_engine = min(map_times[1:]), min(engine_times[1:])
    return {"kernel": kernel, "size": size, "n_train": n_train, "tissue_tiles": n, "tile_px": result.grid.tile,
            "level": result.grid.level, "pairs_per_tile": rel.stats["pairs"] / n,
            "map_seconds": map_times, "engine_seconds": engine_times,
            "map_tiles_per_s": n / best_map, "engine_tiles_per_s": n / best_engine,
            "engine_pairs_per_s": rel.stats["pairs"] / best_engine, "map_over_engine_time": best_map / best_engine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kernels", nargs="+", default=["d4cnn"])
    parser.add_argument("--n-train", type=int, default=350)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in args.kernels:
            rows.append(measure(kernel, args.n_train, args.size, args.repeats, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "slide_map", "machine": machine(), "cpu_flags": cpu_flags(), "versions": versions(),
              "note": "placeholder coefficients: throughput only; best of repeats after one compiling run",
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
