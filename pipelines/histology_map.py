"""Tissue-class maps of whole slides with histology kernel models or ensembles (`eqk histology map`).

The slide is cut into a grid of tiles that cover the same field of view as the model's training
tiles (NCT-CRC-HE-100K: 224 px at 0.5 µm/px = 112 µm), read from the pyramid level closest to the
training resolution without being coarser. The grid is anchored at the slide's top-left corner:
tile (r, c) starts at (r·stride, c·stride) pixels of that level, and the rows and columns that do
not fit whole are left out. Tiles whose tissue fraction (see `eqkernels.slides.tissue_mask`) is
below `min_tissue` are not predicted. Tissue tiles are predicted in batches through the model's
own prediction code (`HistologyModel.predict`, `HistologyEnsemble.predict`: members' mean); each
finished batch is kept in `OUT/.checkpoint/` so a rerun predicts no finished tile again.

Rotation check: rotating the covered region by 90° maps the grid onto itself (positions k·stride,
k = 0 … n−1, reflect to (n−1−k)·stride), and each tile's pixels onto np.rot90 of themselves. So
mapping the rotated slide is exactly predicting np.rot90 of every tile; that is how
`check_rotation` computes it, and the fraction of tissue tiles whose class changes is reported.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from eqkernels.errors import InputError, ModelFileError
from eqkernels.progress import Meter
from eqkernels.slides import Slide, tissue_mask

NCT_MPP = 0.5          # NCT-CRC-HE-100K / CRC-VAL-HE-7K: 224 px tiles at 0.5 µm/px (Kather et al. 2019)
NCT_TILE_PX = 224
MAP_FORMAT = "eqkernels-map-tiles"
PARTIAL_MARKER = "PARTIAL.txt"
DISPLAY_PX = 1200


# ---------------------------------------------------------------------------------------- predictors

@dataclass
class TilePredictor:
    """A model seen as a function of raw RGB tiles (B, h, w, 3) uint8 → (scores (B, C), uncertainty (B,))."""

    predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    size: int                      # model input, px
    label: str                     # e.g. "p4cnn kernel model"
    uncertainty_name: str          # what the uncertainty map shows
    train_mpp: float | None        # µm/px of the raw training tiles
    train_tile_px: int | None      # side of the raw training tiles
    checksum: str = ""             # of the model file: part of the checkpoint fingerprint

    def field_of_view_um(self) -> float:
        """Side of the training tiles in µm."""
        if not self.train_mpp or not self.train_tile_px:
            raise InputError("the model does not record its training tiles' resolution; retrain it with "
                             "--train-mpp, or give --train-mpp and --train-tile-px")
        return self.train_mpp * self.train_tile_px


def kernel_model_predictor(model, checksum: str = "") -> TilePredictor:
    """A `HistologyModel` as a TilePredictor: NTK mean scores and NNGP posterior standard deviation."""
    def predict(images):
        pred = model.predict(images, progress=False)
        return pred.scores, np.sqrt(np.maximum(pred.variance, 0.0))

    return TilePredictor(predict, list(model.class_names), model.preprocessing.size, f"{model.spec.name} kernel model",
                         "NNGP posterior sd", model.options.get("train_mpp"), model.options.get("train_tile_px"),
                         checksum)


def ensemble_predictor(model, checksum: str = "") -> TilePredictor:
    """A `HistologyEnsemble` as a TilePredictor: members' mean scores and their spread."""
    def predict(images):
        pred = model.predict(images)
        return pred.scores, pred.member_std

    return TilePredictor(predict, list(model.class_names), model.preprocessing.size,
                         f"{model.spec.label} ensemble of {model.ensemble.members}", "members' sd of the winning score",
                         model.options.get("train_mpp"), model.options.get("train_tile_px"), checksum)


def load_predictor(path: str | Path, *, train_mpp: float | None = None,
                   train_tile_px: int | None = None) -> TilePredictor:
    """Load a kernel model or ensemble file; `train_mpp` / `train_tile_px` override what it records."""
    from eqkernels import store
    from eqkernels.ensembles import ENSEMBLE_KIND
    from eqkernels.pipelines.histology_ensemble import HistologyEnsemble
    from eqkernels.pipelines.histology_model import HistologyModel

    kind = store.kind_of(path)  # first: it names a missing file or a non-eqkernels file
    checksum = _file_checksum(path)
    if kind == ENSEMBLE_KIND:
        predictor = ensemble_predictor(HistologyEnsemble.load(path), checksum)
    else:
        predictor = kernel_model_predictor(HistologyModel.load(path), checksum)
    if train_mpp is not None:
        if not (math.isfinite(train_mpp) and train_mpp > 0):
            raise InputError(f"--train-mpp must be a positive number of µm per pixel, got {train_mpp}")
        predictor.train_mpp = float(train_mpp)
    if train_tile_px is not None:
        if train_tile_px < 1:
            raise InputError(f"--train-tile-px must be positive, got {train_tile_px}")
        predictor.train_tile_px = int(train_tile_px)
    return predictor


def _file_checksum(path: str | Path) -> str:
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("checksum", ""))
    except OSError:
        raise ModelFileError("not a readable HDF5 model file", path) from None


def known_training_resolution(data: str | Path, tile_px: int) -> float | None:
    """µm/px of training tiles from a public dataset whose scan resolution is documented, else None.

    NCT-CRC-HE-100K / CRC-VAL-HE-7K class folders: 224 px at 0.5 µm/px. MedMNIST PathMNIST (the
    same tiles resized to S px): 0.5 · 224 / S.
    """
    from eqkernels.pipelines.histology import NCT_CLASSES

    data = Path(data)
    if data.is_dir() and tile_px == NCT_TILE_PX:
        names = {p.name for p in data.iterdir() if p.is_dir()}
        if names and names <= set(NCT_CLASSES):
            return NCT_MPP
    if data.suffix.lower() == ".npz" and "pathmnist" in data.name.lower():
        return NCT_MPP * NCT_TILE_PX / tile_px
    return None


# ----------------------------------------------------------------------------------------------- grid

@dataclass
class Grid:
    """Tiles of `tile` px every `stride` px on pyramid level `level` (µm/px `mpp`), `rows` × `cols`."""

    level: int
    downsample: float
    mpp: float
    tile: int
    stride: int
    rows: int
    cols: int

    def origins(self) -> np.ndarray:
        """(rows·cols, 2) top-left (y, x) of every tile on the grid's level, row-major."""
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return np.stack([r.ravel(), c.ravel()], axis=1) * self.stride

    def cell_area_mm2(self) -> float:
        """Area each tile stands for (its stride × stride cell), mm²."""
        return (self.stride * self.mpp * 1e-3) ** 2


def plan_grid(slide: Slide, fov_um: float, model_size: int, train_mpp: float, overlap: float = 0.0) -> Grid:
    """The grid of `fov_um` µm tiles on the coarsest level that is not coarser than `train_mpp` µm/px.

    Level 0 when every level is coarser (the slide was scanned at a lower resolution than the
    training tiles); refused when a tile would then have fewer pixels than the model's input.
    """
    if not 0 <= overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {overlap}")
    mpp0 = slide.level_mpp(0)
    if fov_um / mpp0 < model_size:
        raise InputError(f"at {mpp0:g} µm/px a {fov_um:g} µm tile is {fov_um / mpp0:.1f} px, under the model's "
                         f"input of {model_size} px: the slide is too coarse for this model (check --mpp)", slide.path)
    fine_enough = [i for i in range(len(slide.levels)) if slide.level_mpp(i) <= train_mpp * (1 + 1e-3)]
    level = max(fine_enough or [0], key=lambda i: slide.downsamples[i])
    mpp = slide.level_mpp(level)
    tile = int(round(fov_um / mpp))
    stride = max(int(round(tile * (1 - overlap))), 1)
    height, width = slide.levels[level]
    rows, cols = (height - tile) // stride + 1, (width - tile) // stride + 1
    if rows < 1 or cols < 1:
        raise InputError(f"the slide ({width}×{height} px at level {level}) is smaller than one {tile} px tile",
                         slide.path)
    return Grid(level, slide.downsamples[level], mpp, tile, stride, rows, cols)


def tissue_fractions(slide: Slide, grid: Grid, thumb_px_per_tile: int = 8) -> tuple[np.ndarray, dict]:
    """Tissue fraction of every grid tile (rows·cols,), from a thumbnail with ~8 px per tile side."""
    tile0 = grid.tile * grid.downsample
    thumb, ds = slide.thumbnail(max(tile0 / thumb_px_per_tile, 1.0))
    mask, threshold = tissue_mask(thumb)
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    scale = grid.downsample / ds  # grid-level px → thumbnail px
    o = grid.origins() * scale
    y0 = np.clip(np.rint(o[:, 0]).astype(int), 0, mask.shape[0])
    x0 = np.clip(np.rint(o[:, 1]).astype(int), 0, mask.shape[1])
    y1 = np.clip(np.rint(o[:, 0] + grid.tile * scale).astype(int), 0, mask.shape[0])
    x1 = np.clip(np.rint(o[:, 1] + grid.tile * scale).astype(int), 0, mask.shape[1])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    return inside / area, {"thumbnail_downsample": ds, "threshold_od": threshold,
                           "tissue_fraction_of_slide": float(mask.mean())}


# ----------------------------------------------------------------------------------------- checkpoint

class TileCheckpoint:
    """One HDF5 file per finished batch in `folder`, written atomically; other inputs start it afresh."""

    def __init__(self, folder: Path, fingerprint: str):
        from eqkernels.store import atomic_write_text

        self.folder = folder
        meta = folder / "checkpoint.json"
        if meta.exists():
            try:
                same = json.loads(meta.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:  # made for another model, slide or grid: useless here
                shutil.rmtree(folder)
        if not meta.exists():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta, json.dumps({"format": MAP_FORMAT, "fingerprint": fingerprint}))

    def load(self, batch: int) -> dict | None:
        path = self.folder / f"batch{batch}.h5"
        if not path.exists():
            return None
        try:
            with h5py.File(path, "r") as f:
                return {k: f[k][()] for k in f.keys()}
        except (OSError, KeyError):
            return None  # a damaged batch is simply predicted again

    def save(self, batch: int, arrays: dict[str, np.ndarray]) -> None:
        tmp = self.folder / f".batch{batch}.h5.tmp{os.getpid()}"
        with h5py.File(tmp, "w") as f:
            for k, v in arrays.items():
                f[k] = v
        os.replace(tmp, self.folder / f"batch{batch}.h5")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _fingerprint(predictor: TilePredictor, slide: Slide, grid: Grid, tiles: np.ndarray, check_rotation: bool) -> str:
    stat = slide.path.stat()
    h = hashlib.sha256(json.dumps({"model": predictor.checksum, "slide": str(slide.path.resolve()),
                                   "size": stat.st_size, "mtime": stat.st_mtime_ns, "mpp": slide.mpp,
                                   "grid": grid.__dict__, "rotation": check_rotation}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(tiles).tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- mapping

@dataclass
class SlideMap:
    """Predictions on the tissue tiles of a grid; `done` marks the tiles predicted so far."""

    grid: Grid
    class_names: list[str]
    tissue: np.ndarray            # (rows·cols,) tissue fraction
    tiles: np.ndarray             # (T,) indices of the tissue tiles into the grid, row-major
    scores: np.ndarray            # (T, C)
    uncertainty: np.ndarray       # (T,)
    done: np.ndarray              # (T,) bool
    rotated_classes: np.ndarray | None = None  # (T,) classes of the tiles rotated by 90°
    info: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def classes(self) -> np.ndarray:
        return np.argmax(self.scores, axis=1)


def read_tiles(slide: Slide, grid: Grid, index: np.ndarray) -> np.ndarray:
    """Raw RGB pixels (len(index), tile, tile, 3) uint8 of grid tiles `index`."""
    origins = grid.origins()[index]
    return np.stack([slide.read(grid.level, int(y), int(x), grid.tile, grid.tile) for y, x in origins])


def map_slide(predictor: TilePredictor, slide: Slide, checkpoint_dir: Path, *, overlap: float = 0.0,
              min_tissue: float = 0.25, batch: int = 32, check_rotation: bool = False,
              progress: bool | None = None) -> SlideMap:
    """Predict every tissue tile of `slide`; finished batches are kept in `checkpoint_dir`.

    A KeyboardInterrupt stops between batches and returns the partial map (`complete` False,
    `info["interrupted"]` True) instead of raising, so the caller can write it marked as partial.
    """
    if not 0 <= min_tissue <= 1:
        raise InputError(f"--min-tissue must be a fraction in [0, 1], got {min_tissue}")
    grid = plan_grid(slide, predictor.field_of_view_um(), predictor.size, predictor.train_mpp, overlap)
    tissue, info = tissue_fractions(slide, grid)
    # The maps are drawn over a thumbnail of about DISPLAY_PX on its long side.
    long_side = max(slide.levels[0])
    info["display"], info["display_downsample"] = slide.thumbnail(max(long_side / DISPLAY_PX, 1.0))
    tiles = np.flatnonzero(tissue >= max(min_tissue, 1e-9))
    if len(tiles) == 0:
        raise InputError(f"no tissue found: no tile of the {grid.rows}×{grid.cols} grid is at least "
                         f"{min_tissue:.0%} tissue (optical density > {info['threshold_od']:.3f}); lower --min-tissue "
                         "if the tissue is very faint", slide.path)
    n_classes = len(predictor.class_names)
    result = SlideMap(grid, predictor.class_names, tissue, tiles, np.full((len(tiles), n_classes), np.nan),
                      np.full(len(tiles), np.nan), np.zeros(len(tiles), bool),
                      np.full(len(tiles), -1) if check_rotation else None, info)
    store = TileCheckpoint(checkpoint_dir, _fingerprint(predictor, slide, grid, tiles, check_rotation))
    _run_batches(predictor, slide, result, store, batch, progress)
    return result


def _run_batches(predictor: TilePredictor, slide: Slide, result: SlideMap, store: TileCheckpoint, batch: int,
                 progress: bool | None) -> None:
    """Fill `result` batch by batch from the checkpoint or the model; Ctrl-C leaves it partial."""
    starts = range(0, len(result.tiles), batch)
    started, predicted = time.perf_counter(), 0
    with Meter(len(result.tiles), "mapping tiles", unit="tiles", enabled=progress) as meter:
        try:
            for b, s in enumerate(starts):
                part = slice(s, min(s + batch, len(result.tiles)))
                found = store.load(b)
                if found is None:
                    found = _predict_batch(predictor, read_tiles(slide, result.grid, result.tiles[part]),
                                           result.rotated_classes is not None)
                    store.save(b, found)
                    predicted += part.stop - part.start
                result.scores[part], result.uncertainty[part] = found["scores"], found["uncertainty"]
                if result.rotated_classes is not None:
                    result.rotated_classes[part] = found["rotated_classes"]
                result.done[part] = True
                meter.advance(part.stop - part.start)
        except KeyboardInterrupt:
            result.info["interrupted"] = True
    seconds = time.perf_counter() - started
    result.info.update(tiles_predicted=predicted, tiles_resumed=int(result.done.sum()) - predicted, seconds=seconds,
                       tiles_per_s=predicted / seconds if predicted and seconds > 0 else None)


def _predict_batch(predictor: TilePredictor, images: np.ndarray, rotation: bool) -> dict[str, np.ndarray]:
    scores, uncertainty = predictor.predict(images)
    out = {"scores": np.asarray(scores, np.float64), "uncertainty": np.asarray(uncertainty, np.float64)}
    if rotation:
        rotated, _ = predictor.predict(np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2))))
        out["rotated_classes"] = np.argmax(np.asarray(rotated), axis=1)
    return out


# ------------------------------------------------------------------------------------ a test slide

GLASS_GREY = 242  # the blank slots: plain glass, as bright as the NCT background tiles (mean grey 244)
TEST_LAYOUT = [["ADI", "BACK", "DEB", "LYM"], ["MUC", "MUS", "NORM", "STR"], ["TUM", "STR", "STR", None]]


def assemble_test_slide(path: str | Path, *, extra_str: list[Path] | None = None, flavour: str = "tiff",
                        rotate: int = 0) -> list[list[str | None]]:
    """Write a 3 × 4-tile slide of real 224 px tiles at 0.5 µm/px as a pyramidal tiled TIFF; returns its layout.

    Row 1 and 2 hold the nine bundled NCT-CRC-HE-100K tiles (one per class) in `TEST_LAYOUT`;
    the two further STR slots take `extra_str` (e.g. the two CRC-VAL-HE-7K stroma tiles of
    shared/data) or are glass without them; the last slot is glass. `rotate` turns the whole
    slide by k·90° (np.rot90) before writing, and the layout with it.
    """
    from eqkernels.datasets import NCT_CRC_SAMPLE
    from eqkernels.pipelines.histology import read_tile
    from eqkernels.slides import write_pyramidal_tiff

    extra = list(extra_str or [])
    glass = np.full((NCT_TILE_PX, NCT_TILE_PX, 3), GLASS_GREY, np.uint8)
    layout, rows, used_nct = [], [], set()
    for names in TEST_LAYOUT:
        row_tiles, row_names = [], []
        for name in names:
            if name is None or (name in used_nct and not extra):
                tile, name = glass, None
            elif name in used_nct:
                tile = read_tile(extra.pop(0))
            else:
                tile = read_tile(next((NCT_CRC_SAMPLE / name).glob("*.tif")))
                used_nct.add(name)
            row_tiles.append(tile)
            row_names.append(name)
        rows.append(np.concatenate(row_tiles, axis=1))
        layout.append(row_names)
    image = np.rot90(np.concatenate(rows, axis=0), rotate)
    write_pyramidal_tiff(np.ascontiguousarray(image), path, NCT_MPP, levels=3, tile=256, flavour=flavour)
    return [list(r) for r in np.rot90(np.array(layout, dtype=object), rotate)]


def map_demo_slide(model, out_dir: str | Path, *, check_rotation: bool = True, progress: bool | None = None) -> dict:
    """Map the assembled test slide (bundled tiles only) with an in-memory kernel model; outputs in `out_dir`."""
    import tempfile

    from eqkernels.pipelines.histology_map_report import write_outputs
    from eqkernels.slides import open_slide

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test-slide.tif"
        layout = assemble_test_slide(path)
        predictor = kernel_model_predictor(model)
        with open_slide(path) as slide:
            result = map_slide(predictor, slide, Path(tmp) / "checkpoint", check_rotation=check_rotation,
                               progress=progress)
            info = write_outputs(result, predictor, slide, f"in-memory {model.spec.name} model", out_dir)
    expected = {(r, c): n for r, row in enumerate(layout) for c, n in enumerate(row) if n is not None}
    cells = {tuple(int(v) for v in divmod(int(t), result.grid.cols)): result.class_names[k]
             for t, k in zip(result.tiles, result.classes)}
    hits = [cells[key] == name for key, name in expected.items() if key in cells]
    info["layout_accuracy"] = float(np.mean(hits)) if hits else None
    info["layout"] = layout
    return info
