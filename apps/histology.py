"""`eqk histology train | predict | report`: H&E tile classification with (equivariant) NTKs."""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from eqkernels.apps._common import atomic_dir, cluster_option, console, kernel_executor, scheduler_option, to_jsonable
from eqkernels.errors import InputError
from eqkernels.kernels.spec import KERNEL_FAMILIES, ConvNetSpec, KernelSpec

app = typer.Typer(no_args_is_help=True, help="Histology tiles: train, predict, report.")

KernelName = Enum("KernelName", {k: k for k in KERNEL_FAMILIES}, type=str)
ReadoutName = Enum("ReadoutName", {"linear": "linear", "mlp": "mlp"}, type=str)
PaddingName = Enum("PaddingName", {"VALID": "VALID", "SAME": "SAME", "CIRCULAR": "CIRCULAR"}, type=str)


def default_data() -> Path:
    from eqkernels.datasets import PATHMNIST_SAMPLE

    return PATHMNIST_SAMPLE


def parse_time(value: str) -> float | None:
    """'inf' (kernel ridge regression) or a non-negative gradient-flow time."""
    if value.strip().lower() in ("inf", "infinity", "none"):
        return None
    try:
        t = float(value)
    except ValueError:
        raise InputError(f"--time must be a number or 'inf', got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise InputError(f"--time must be >= 0 or 'inf', got {value!r}")
    return t


@app.command()
def train(
    data: Path = typer.Option(None, help="Tiles: folder of class folders, MedMNIST .npz or hmnist .csv "
                                         "[default: bundled PathMNIST sample]"),
    kernel: KernelName = typer.Option("cnn", help="Kernel family."),
    size: int = typer.Option(28, help="Tiles are resized to size×size pixels."),
    n_train: int = typer.Option(200, "--n-train", help="Training tiles (class-stratified, the rest is held out)."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
    ridge: float = typer.Option(1e-6, help="Diagonal regulariser, relative to the mean kernel diagonal."),
    time_: str = typer.Option("inf", "--time", help="Gradient-flow time t of the mean prediction ('inf' = kernel ridge regression)."),
    learning_rate: float = typer.Option(1.0, "--learning-rate", help="Learning rate η in exp(−η Θ t)."),
    depth: int = typer.Option(2, help="Number of 3×3 convolutions."),
    readout: ReadoutName = typer.Option("linear", help="Readout after pooling: linear, or mlp (Dense-ReLU-Dense)."),
    padding: PaddingName = typer.Option("VALID", help="Convolution padding."),
    out: Path = typer.Option(Path("histology-model.h5"), "--out", "-o", help="Model file to write."),
    checkpoint: Optional[Path] = typer.Option(None, help="Folder for resumable kernel blocks."),
    train_mpp: Optional[float] = typer.Option(None, "--train-mpp", help="µm per pixel of the training tiles, stored "
                                              "for `eqk histology map` [default: known for NCT-CRC-HE-100K and "
                                              "PathMNIST]"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    cluster: Optional[str] = cluster_option(),
    scheduler: Optional[str] = scheduler_option(),
    inducing: str = typer.Option("auto", "--inducing", help="Solver: 'exact' KRR, M inducing points (Nyström-"
                                 "preconditioned CG), or 'auto': exact while the N×N kernels fit the memory budget, "
                                 "else M = min(N, 2000)."),
):
    """Train a kernel model on histology tiles and write it to one HDF5 file."""
    from eqkernels.nystrom import check_inducing, describe_solver, parse_inducing
    from eqkernels.pipelines.histology import load_tiles, stratified_split
    from eqkernels.pipelines.histology_model import train_model

    inducing_choice = check_inducing(parse_inducing(inducing), n_train)  # before any data is read
    t_value = parse_time(time_)
    if ridge < 0:
        raise InputError(f"--ridge must be >= 0, got {ridge}")
    try:
        spec = KernelSpec(kernel.value, ConvNetSpec(depth=depth, readout=readout.value, padding=padding.value))
        spec.net.check_input_size(size)
    except ValueError as e:
        raise InputError(str(e)) from None
    data = data or default_data()
    tiles = load_tiles(data)
    if min(np.bincount(tiles.labels)) < 1 or len(tiles.class_names) < 2:
        raise InputError("need labelled tiles of at least two classes", data)
    train_idx, _ = stratified_split(tiles.labels, n_train, seed=seed)
    resolution = _training_resolution(train_mpp, data, tiles.images.shape[1])
    start = time.perf_counter()
    with kernel_executor(cluster, scheduler) as executor:
        model, timings = train_model(spec, tiles.subset(train_idx), size=size, ridge=ridge, time=t_value,
                                     learning_rate=learning_rate, checkpoint=checkpoint,
                                     options={"data": str(data), "seed": seed, "n_train": n_train,
                                              "n_tiles": len(tiles), **resolution}, inducing=inducing_choice,
                                     executor=executor)
    model.save(out)
    if checkpoint is not None:
        from eqkernels.apps.kernel import remove_checkpoint

        remove_checkpoint(checkpoint)
    summary = {"model": str(out), "kernel": spec.name, "n_train": len(train_idx), "size": size,
               "classes": model.class_names, "seconds": time.perf_counter() - start, **timings,
               "solver": model.options.get("solver")}
    if as_json:
        print(json.dumps(to_jsonable(summary)))
    else:
        console.print(f"trained [bold]{spec.name}[/] on {len(train_idx)} tiles ({size}×{size} px) in "
                      f"{summary['seconds']:.1f} s (kernel {timings['kernel_s']:.1f} s) → {out}")
        console.print(f"solver: {describe_solver(model.options.get('solver'))}", markup=False)


def _training_resolution(train_mpp: float | None, data: Path, tile_px: int) -> dict:
    """{'train_mpp', 'train_tile_px'} for the model's options: given, known for the dataset, or absent."""
    from eqkernels.pipelines.histology_map import known_training_resolution

    if train_mpp is not None and not (math.isfinite(train_mpp) and train_mpp > 0):
        raise InputError(f"--train-mpp must be a positive number of µm per pixel, got {train_mpp}")
    mpp = train_mpp if train_mpp is not None else known_training_resolution(data, tile_px)
    return {} if mpp is None else {"train_mpp": float(mpp), "train_tile_px": int(tile_px)}


def _refuse_slides(path: Path) -> None:
    """A multi-page or pyramidal TIFF is a slide, not a tile: say so instead of reading its first page."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            subifds = bool(tif.pages.first.subifds)
            pyramidal = subifds or len(tif.series[0].levels) > 1
    except Exception:
        return  # read_tile gives the one-line error for damaged files
    if pages > 1 or subifds:
        kind = "pyramidal" if pyramidal else "multi-page"
        raise InputError(f"is a {kind} TIFF ({pages} pages{', with sub-resolutions' if subifds else ''}), a slide "
                         "rather than a tile; map it with `eqk histology map MODEL SLIDE --out DIR`", path)


def _check_tile_size(side: int, model_size: int, name: str) -> None:
    """Refuse tiles under half the model's input, warn below it.

    Under half, resizing up more than 2× gives the model a blur unlike any training tile, yet its
    scores look as confident as any: refused. Between half and the input size the upsampling is
    mild, so the prediction is made, with a warning on stderr.
    """
    if 2 * side < model_size:
        raise InputError(f"tile is {side}×{side} px, under half the model's input of {model_size} px; upsampling "
                         "it that far gives the model a blur unlike its training tiles", name)
    if side < model_size:
        print(f"eqk: warning: {name}: tile is {side}×{side} px, smaller than the model's input of {model_size} px; "
              "it is upsampled", file=sys.stderr)


def _collect_inputs(model, paths: List[Path]):
    """Preprocessed inputs (M, S, S, 3) and names: tile files, or folders / npz / csv holding many.

    Each collection is resized to the model's tile size separately, so tiles of any square size mix.
    """
    from eqkernels.pipelines.histology import IMAGE_SUFFIXES, load_tiles, read_tile

    inputs, names = [], []
    for p in paths:
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.suffix.lower() in (".tif", ".tiff"):
                _refuse_slides(p)
            images, these = read_tile(p)[None], [str(p)]
        else:
            tiles = load_tiles(p)
            images, these = tiles.images, tiles.sources
        _check_tile_size(images.shape[1], model.preprocessing.size, str(p))
        inputs.append(model.preprocessing(images))
        names += these
    return np.concatenate(inputs), names


@app.command()
def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `eqk histology train`, or an "
                                                                 "ensemble file (e.g. from `eqk compare`)."),
    tiles: List[Path] = typer.Argument(..., metavar="TILE...", help="Tile files (TIFF/PNG) or tile collections."),
    kernel: Optional[KernelName] = typer.Option(None, help="Refuse the model unless it uses this kernel."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per tile on stdout."),
):
    """Predict the class of each tile, with scores for every class (an ensemble: the members' mean)."""
    from eqkernels import store
    from eqkernels.ensembles import ENSEMBLE_KIND
    from eqkernels.pipelines.histology_model import HistologyModel

    if store.kind_of(model_path) == ENSEMBLE_KIND:
        if kernel is not None:
            raise InputError(f"holds a finite-width ensemble, not a kernel model; --kernel {kernel.value} "
                             "applies to kernel models only", model_path)
        return _predict_ensemble(model_path, tiles, as_json)
    model = HistologyModel.load(model_path, expected_kernel=kernel.value if kernel else None)
    inputs, names = _collect_inputs(model, tiles)
    pred = model.predict_from_relative(model.relative(inputs, progress=None))
    std = np.sqrt(pred.variance)
    if as_json:
        for name, cls, scores, s in zip(names, pred.classes, pred.scores, std):
            print(json.dumps(to_jsonable({"tile": name, "class": model.class_names[cls],
                                          "scores": dict(zip(model.class_names, scores)), "nngp_std": s})))
        return
    table = Table(title=f"{model.spec.name} predictions (scores: NTK mean of centred one-hot targets)")
    table.add_column("tile", overflow="fold", max_width=48)
    table.add_column("class")
    table.add_column("score", justify="right")
    table.add_column("runner-up")
    table.add_column("NNGP sd", justify="right")
    for name, cls, scores, s in zip(names, pred.classes, pred.scores, std):
        second = int(np.argsort(scores)[-2]) if len(scores) > 1 else cls
        table.add_row(_short(name), f"[bold]{model.class_names[cls]}[/]", f"{scores[cls]:+.3f}",
                      f"{model.class_names[second]} {scores[second]:+.3f}", f"{s:.3f}")
    console.print(table)
    console.print("all class scores: --json")


def _predict_ensemble(path: Path, tiles: List[Path], as_json: bool) -> None:
    """`predict` for an ensemble file: mean of the members' scores, and their spread."""
    from eqkernels.pipelines.histology_ensemble import HistologyEnsemble

    model = HistologyEnsemble.load(path)
    inputs, names = _collect_inputs(model, tiles)
    pred = model.predict_inputs(inputs)
    members = model.ensemble.members
    if as_json:
        for name, cls, scores, s in zip(names, pred.classes, pred.scores, pred.member_std):
            print(json.dumps(to_jsonable({"tile": name, "class": model.class_names[cls],
                                          "scores": dict(zip(model.class_names, scores)), "member_std": s,
                                          "members": members})))
        return
    table = Table(title=f"{model.spec.label} ensemble of {members} predictions (scores: members' mean of centred "
                        "one-hot targets)")
    table.add_column("tile", overflow="fold", max_width=48)
    table.add_column("class")
    table.add_column("score", justify="right")
    table.add_column("runner-up")
    table.add_column("member sd", justify="right")
    for name, cls, scores, s in zip(names, pred.classes, pred.scores, pred.member_std):
        second = int(np.argsort(scores)[-2]) if len(scores) > 1 else cls
        table.add_row(_short(name), f"[bold]{model.class_names[cls]}[/]", f"{scores[cls]:+.3f}",
                      f"{model.class_names[second]} {scores[second]:+.3f}", f"{s:.3f}")
    console.print(table)
    console.print("all class scores: --json")


def _short(name: str) -> str:
    """A tile's name relative to the working folder when it lies below it."""
    import os

    try:
        rel = os.path.relpath(name)
        return rel if not rel.startswith("..") else name
    except ValueError:
        return name


@app.command()
def report(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `eqk histology train`."),
    data: Path = typer.Option(None, help="Labelled tiles; training tiles in it are left out [default: bundled sample]."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="Evaluate on this many held-out tiles (stratified)."),
    seed: int = typer.Option(0, help="Seed for picking --n-test tiles."),
    kernel: Optional[KernelName] = typer.Option(None, help="Refuse the model unless it uses this kernel."),
    out: Path = typer.Option(Path("histology-report"), "--out", "-o", help="Report folder (JSON, Markdown, PNG)."),
    sweep_tiles: int = typer.Option(24, "--sweep-tiles", help="Held-out tiles rotated at every angle (0: no sweep); "
                                                              "each costs 8 kernel rows × |G|²/|H| of the kernel."),
    ood: Optional[Path] = typer.Option(None, help="OOD tiles for the orbit-same table [default: bundled "
                                                  "Kather-2016 8×8 tiles]; as many noise images are added."),
    n_ood: int = typer.Option(12, "--n-ood", help="OOD tiles and noise images in the sweep (0: none)."),
    angle_step: float = typer.Option(15.0, "--angle-step", help="Degrees between the angles of the sweep."),
):
    """Accuracy, per-class recall, confusion matrix and rotation robustness on held-out tiles (the quarter
    turns of the full tile, and every --angle-step degrees on the disk with orbit-same for C4/C8/C16)."""
    from eqkernels.pipelines.histology import load_tiles, stratified_split
    from eqkernels.pipelines.histology_model import HistologyModel
    from eqkernels.pipelines.histology_report import (evaluate, exclude_training_tiles, rotation_sweep,
                                                      sweep_angles, sweep_sets, write_report)

    if sweep_tiles < 0 or n_ood < 0:
        raise InputError("--sweep-tiles and --n-ood must be >= 0")
    try:
        sweep_angles(angle_step)
    except ValueError as e:
        raise InputError(str(e)) from None

    model = HistologyModel.load(model_path, expected_kernel=kernel.value if kernel else None)
    data = data or default_data()
    tiles = exclude_training_tiles(model, load_tiles(data))
    if len(tiles) == 0:
        raise InputError("every tile in it was used for training; nothing is left to evaluate", data)
    if tiles.class_names != model.class_names:
        raise InputError(f"classes {tiles.class_names} differ from the model's {model.class_names}", data)
    if n_test is not None and n_test < len(tiles):
        tiles = tiles.subset(stratified_split(tiles.labels, n_test, seed=seed)[0])
    evaluation = evaluate([model], tiles, progress=None)
    if sweep_tiles:
        from eqkernels.datasets import KATHER2016_8X8

        ood_tiles = load_tiles(ood or KATHER2016_8X8) if n_ood else None
        sets, labels = sweep_sets(model, tiles, n_tiles=sweep_tiles, ood=ood_tiles, n_ood=n_ood, seed=seed)
        for e in evaluation:
            e.sweep = rotation_sweep(model, sets, labels, step=angle_step, progress=None)
    with atomic_dir(out) as tmp:
        rep = write_report(evaluation, tmp, title=f"Histology report: {model.spec.name}",
                           context={"model": str(model_path), "data": str(data), "held-out tiles": len(tiles),
                                    "training tiles": len(model.train_inputs),
                                    "tile size": f"{model.preprocessing.size} px"})
    s = rep["models"][0]
    swept = ""
    if s.get("rotation_sweep"):
        orbit = s["rotation_sweep"]["sets"]["test"]["orbit_same"]
        swept = ", on the disk " + " / ".join(f"{orbit[g]:.2f}/{g[1:]}" for g in orbit)
    console.print(f"{model.spec.name}: accuracy {s['accuracy']:.3f} on {s['n_test']} tiles, rotated "
                  f"{s['accuracy_rotated_mean']:.3f}, orbit-same {s['orbit_same_predictions']:.2f}/4{swept} "
                  f"→ {out}/report.md")


@app.command("map")
def map_(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Kernel model (`eqk histology train`) or ensemble file."),
    slide_path: Path = typer.Argument(..., metavar="SLIDE", help="Slide: pyramidal TIFF, OME-TIFF, SVS, NDPI, PNG/JPEG; "
                                                                 "other vendor formats with the openslide extra."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the maps, area tables and GeoJSON."),
    mpp: Optional[float] = typer.Option(None, help="µm per pixel of the slide's full resolution (overrides its metadata)."),
    reader: str = typer.Option("auto", help="Slide reader: auto, tifffile, openslide or pillow."),
    train_mpp: Optional[float] = typer.Option(None, "--train-mpp", help="µm per pixel of the model's training tiles "
                                                                        "(overrides the model's record)."),
    train_tile_px: Optional[int] = typer.Option(None, "--train-tile-px", help="Side of the raw training tiles in px."),
    min_tissue: float = typer.Option(0.25, "--min-tissue", help="Predict tiles with at least this tissue fraction "
                                     "(NCT fat tiles are about 40 % stained pixels)."),
    overlap: float = typer.Option(0.0, help="Tile overlap as a fraction of the tile side (stride = side·(1−overlap))."),
    batch: int = typer.Option(32, help="Tiles per prediction batch (and per checkpoint)."),
    check_rotation: bool = typer.Option(False, "--check-rotation", help="Also map the slide rotated by 90° and report "
                                                                        "how much tissue changes class."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Map tissue classes over a whole slide: class and uncertainty maps, areas, GeoJSON (resumable)."""
    from eqkernels.pipelines.histology_map import load_predictor, map_slide
    from eqkernels.pipelines.histology_map_report import write_outputs
    from eqkernels.slides import open_slide

    if batch < 1:
        raise InputError(f"--batch must be positive, got {batch}")
    predictor = load_predictor(model_path, train_mpp=train_mpp, train_tile_px=train_tile_px)
    with open_slide(slide_path, mpp=mpp, reader=reader) as slide:
        result = map_slide(predictor, slide, out / ".checkpoint", overlap=overlap, min_tissue=min_tissue, batch=batch,
                           check_rotation=check_rotation, progress=None)
        info = write_outputs(result, predictor, slide, model_path, out)
    if not result.complete:
        print(f"eqk: interrupted: PARTIAL map of {info['tiles_done']} of {info['tissue_tiles']} tissue tiles written to "
              f"{out}/ (marked PARTIAL); rerun the same command to finish it", file=sys.stderr)
        raise typer.Exit(130)
    shutil.rmtree(out / ".checkpoint", ignore_errors=True)
    _print_map_summary(info, out, as_json)


def _print_map_summary(info: dict, out: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(to_jsonable(info)))
        return
    rate = f", {info['tiles_per_s']:.1f} tiles/s" if info.get("tiles_per_s") else ""
    console.print(f"mapped {info['tissue_tiles']} tissue tiles of {info['grid_rows']}×{info['grid_cols']} "
                  f"({info['field_of_view_um']:.0f} µm, {info['tile_px']} px at level {info['level']}){rate} → "
                  f"{out}/class_map.png, areas.md, tiles.geojson")
    rot = info.get("rotation_check")
    if rot:
        console.print(f"rotated by 90°: class changes on {rot['tiles_changed']} of {rot['tiles']} tissue tiles")


@app.command("make-test-slide")
def make_test_slide(
    out: Path = typer.Argument(Path("test-slide.tif"), help="TIFF file to write."),
    flavour: str = typer.Option("tiff", help="tiff (SubIFD pyramid), ome (OME-TIFF) or svs (Aperio-style pages)."),
    extra_str: List[Path] = typer.Option([], "--extra-str", help="Further stroma (STR) tiles for the two spare slots."),
):
    """Assemble a small pyramidal slide (0.5 µm/px) from the bundled real NCT-CRC-HE-100K tiles in a known layout."""
    from eqkernels.store import atomic_file
    from eqkernels.pipelines.histology_map import assemble_test_slide

    if flavour not in ("tiff", "ome", "svs"):
        raise InputError(f"--flavour must be tiff, ome or svs, got {flavour!r}")
    with atomic_file(out) as tmp:
        layout = assemble_test_slide(tmp, extra_str=extra_str, flavour=flavour)
    console.print(f"wrote {out}: 3×4 tiles of 224 px at 0.5 µm/px; layout (rows, '-' = glass):")
    for row in layout:
        console.print("  " + " ".join(f"{name or '-':5}" for name in row))
