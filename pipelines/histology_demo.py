"""The histology part of `eqk demo`: four kernels side by side on the bundled PathMNIST tiles.

All four models (plain CNN, C4-averaged CNN, C4 GCNN, D4 GCNN) share one CNN, one split and one
preprocessing, so the demo computes the D4 relative kernels once — train × train (using the
symmetry M_{g⁻¹} = M_gᵀ) and test × train — and derives every model and every rotated test copy
from them. The number of tiles is chosen from the measured kernel throughput so the whole part
fits its time budget.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from eqkernels.groups import get_group
from eqkernels.kernels import ConvNetSpec, KernelSpec
from eqkernels.kernels.families import family_kernels
from eqkernels.kernels.relative import relative_kernels
from eqkernels.pipelines.histology import Preprocessing, TileSet, load_tiles, stratified_split
from eqkernels.pipelines.histology_model import fit_from_kernels
from eqkernels.pipelines.histology_report import evaluate, write_report

KERNELS = ("cnn", "cnn-c4avg", "p4cnn", "d4cnn")
MAP_KERNEL = "d4cnn"


def pairs_alone(kernel: str, n_train: int, n_test: int) -> int:
    """Kernel pairs `eqk histology train` + `report` would evaluate for this model on its own."""
    spec = KernelSpec(kernel)
    order = get_group(spec.group or "C1").order
    union = max(order, 4)  # the report always needs the four rotations
    train = {1: n_train * (n_train + 1) // 2, 4: 2 * n_train ** 2 + n_train, 8: 4 * n_train ** 2 + 3 * n_train}[order]
    return train + union * n_test * n_train + union * n_test


def shared_pairs(n_train: int, n_test: int) -> int:
    """Pairs of the shared D4 computation (train × train symmetric + test × train with self terms)."""
    return 4 * n_train ** 2 + 3 * n_train + 8 * n_test * n_train + 8 * n_test


def measure_rate(net: ConvNetSpec, images: np.ndarray, size: int) -> float:
    """Kernel pairs per second on this machine, after compilation (a few hundred pairs)."""
    prep = Preprocessing.fit(images[:32], size)
    x = prep(images[:32])
    relative_kernels(net, x[:16], x[16:32], "C4", progress=False)  # compile
    start = time.perf_counter()
    n = relative_kernels(net, x[:16], x[16:32], "D4", progress=False).stats["pairs"]
    return n / (time.perf_counter() - start)


def choose_sizes(rate: float, seconds: float, n_tiles: int, n_classes: int) -> tuple[int, int]:
    """Largest (n_train, n_test), n_test ≈ n_train, whose shared D4 kernels fit in `seconds`."""
    n = int(math.sqrt(max(rate * seconds, 0) / 12))
    n_train = max(min(n, int(0.6 * n_tiles)), 2 * n_classes)
    n_test = max(min(n_train, n_tiles - n_train), n_classes)
    while n_train > 2 * n_classes and shared_pairs(n_train, n_test) > rate * seconds:
        n_train, n_test = n_train - 4, max(n_test - 4, n_classes)
    return n_train, n_test


def run(out_dir: Path, *, seconds: float = 300.0, size: int = 16, seed: int = 0, ridge: float = 1e-4,
        tiles: TileSet | None = None, n_train: int | None = None, n_test: int | None = None,
        progress: bool | None = True) -> dict:
    """Train and evaluate the four kernels; writes the report into `out_dir`; returns the summary."""
    from eqkernels.datasets import PATHMNIST_SAMPLE

    started = time.perf_counter()
    tiles_given = tiles is not None
    tiles = tiles if tiles_given else load_tiles(PATHMNIST_SAMPLE)
    net = ConvNetSpec()
    rate = measure_rate(net, tiles.images, size)
    if n_train is None or n_test is None:
        # The budget pays for the kernels; solving and reporting take a few seconds on top.
        n_train, n_test = choose_sizes(rate, 0.9 * seconds - (time.perf_counter() - started), len(tiles),
                                       len(tiles.class_names))
    resolution = {} if tiles_given else _pathmnist_resolution(tiles)
    train_idx, test_idx = stratified_split(tiles.labels, n_train, n_test, seed=seed)
    train, test = tiles.subset(train_idx), tiles.subset(test_idx)
    prep = Preprocessing.fit(train.images, size)
    x_train = prep(train.images)

    t0 = time.perf_counter()
    rel_train = relative_kernels(net, x_train, None, "D4", need_self=True, progress=progress,
                                 description="train × train kernels (D4, shared)")
    train_seconds = time.perf_counter() - t0
    models, solve_seconds = [], {}
    for name in KERNELS:
        t1 = time.perf_counter()
        spec = KernelSpec(name, net)
        models.append(fit_from_kernels(spec, prep, train, x_train, family_kernels(spec, rel_train), ridge=ridge,
                                       time=None, learning_rate=1.0,
                                       options={"data": str(PATHMNIST_SAMPLE), "seed": seed, "n_train": n_train,
                                                **resolution}))
        solve_seconds[name] = time.perf_counter() - t1
    evaluations = evaluate(models, test, progress=progress)
    test_seconds = evaluations[0].seconds["test_kernel_shared"]
    shared = rel_train.stats["pairs"] + 8 * n_test * n_train + 8 * n_test
    measured_rate = shared / max(train_seconds + test_seconds, 1e-9)
    extra = {}
    for e, name in zip(evaluations, KERNELS):
        alone = pairs_alone(name, n_train, n_test)
        extra[name] = {"pairs_alone": alone,
                       "seconds": alone / measured_rate + solve_seconds[name] + e.seconds.get("predict", 0.0)}
        e.seconds.update(extra[name])
    context = {"data": "bundled PathMNIST sample (718 real 28×28 tiles, 9 classes)",
               "tiles": f"{n_train} training, {n_test} held-out (class-stratified, seed {seed}), resized to {size}×{size} px",
               "network": f"{net.depth}× conv{net.filter_size}×{net.filter_size} {net.padding} → ReLU, global average pool, "
                          f"{net.readout} readout; kernel ridge regression (t = ∞), ridge {ridge:g}",
               "kernel throughput": f"{measured_rate:,.0f} pairs/s measured ({shared:,} pairs of shared D4 kernels in "
                                    f"{train_seconds + test_seconds:.1f} s)",
               "seconds column": "pairs this model needs on its own ÷ measured pairs/s + solve + predict"}
    report = write_report(evaluations, out_dir, title="eqk demo: histology", context=context)
    from eqkernels.pipelines.histology_report import markdown_report

    (Path(out_dir) / "report.md").write_text(markdown_report("eqk demo: histology", context, report["models"], extra))
    slide_map = _map_part(models, Path(out_dir) / "map", progress) if resolution else None
    return {"models": report["models"], "extra": extra, "context": context, "n_train": n_train, "n_test": n_test,
            "size": size, "rate_calibration": rate, "rate_measured": measured_rate, "map": slide_map,
            "seconds_total": time.perf_counter() - started}


def _pathmnist_resolution(tiles: TileSet) -> dict:
    """The training resolution of PathMNIST tiles, recorded so `eqk histology map` can tile slides."""
    from eqkernels.datasets import PATHMNIST_SAMPLE
    from eqkernels.pipelines.histology_map import known_training_resolution

    mpp = known_training_resolution(PATHMNIST_SAMPLE, tiles.images.shape[1])
    return {"train_mpp": mpp, "train_tile_px": int(tiles.images.shape[1])}


def _map_part(models, out_dir: Path, progress) -> dict:
    """The demo's slide map: the D4 model on the slide assembled from the bundled NCT tiles, with the rotation check."""
    from eqkernels.pipelines.histology_map import map_demo_slide

    model = models[KERNELS.index(MAP_KERNEL)]
    info = map_demo_slide(model, out_dir, check_rotation=True, progress=progress)
    keep = ("tissue_tiles", "tiles_per_s", "seconds", "rotation_check", "layout_accuracy", "areas", "tile_px", "level")
    return {"kernel": MAP_KERNEL, "folder": str(out_dir), **{k: info[k] for k in keep}}
