"""Histology tiles: loading (TIFF class folders, MedMNIST npz, hmnist CSV), preprocessing, splits.

Supported layouts, read in their original public form:
- a folder of class folders of TIFF tiles: NCT-CRC-HE-100K / CRC-VAL-HE-7K (ADI BACK DEB LYM MUC MUS
  NORM STR TUM) and Kather 2016 (01_TUMOR … 08_EMPTY); any other class-folder names work too;
- a MedMNIST `pathmnist.npz` with `<split>_images` (N, H, W, 3) uint8 and `<split>_labels` (N, 1);
- a Kaggle "Colorectal Histology MNIST" `hmnist_<S>_<S>_RGB.csv` (S·S·3 pixel columns, label 1–8).

Tiles are resized to a square size with anti-aliasing (Pillow's area-aware resampling), scaled to
[0, 1] and standardised per channel with statistics fitted on the training tiles only.
"""
from __future__ import annotations

import csv
import hashlib
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels.errors import InputError

NCT_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
NCT_DESCRIPTIONS = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                    "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]
KATHER2016_CLASSES = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA",
                      "07_ADIPOSE", "08_EMPTY"]
# MedMNIST's PathMNIST labels 0..8 follow the NCT-CRC-HE-100K class order.
PATHMNIST_CLASSES = NCT_CLASSES
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg"}


@dataclass
class TileSet:
    """Raw RGB tiles (N, H, W, 3) uint8 with integer labels and where each tile came from."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "TileSet":
        idx = np.asarray(idx, dtype=int)
        return TileSet(self.images[idx], self.labels[idx], self.class_names, [self.sources[i] for i in idx])

    def fingerprints(self) -> np.ndarray:
        """sha256 (first 16 hex digits) of each tile's pixels: identifies tiles across runs."""
        return np.array([hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()[:16] for t in self.images],
                        dtype="S16")


# ----------------------------------------------------------------------------------------------- reading

def read_tile(path: str | Path) -> np.ndarray:
    """One RGB tile as (H, W, 3) uint8; a clear InputError for anything else."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import logging

            import tifffile

            # tifffile logs its own complaint about damaged files; ours is the one line the user sees.
            logging.getLogger("tifffile").setLevel(logging.ERROR)
            with tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise ValueError("no image in file")
                image = tif.pages[0].asarray()
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                image = np.asarray(im)
    except InputError:
        raise
    except Exception as e:  # tifffile/Pillow raise many types for damaged files
        kind = "TIFF" if path.suffix.lower() in TIFF_SUFFIXES else "image"
        raise InputError(f"corrupt or truncated {kind} ({type(e).__name__}: {_first_line(e)})", path) from None
    return _as_rgb_uint8(image, path)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else "no detail"


def _as_rgb_uint8(image: np.ndarray, path) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"not an RGB tile: shape {tuple(image.shape)}, expected (H, W, 3)", path)
    if image.shape[0] != image.shape[1]:
        raise InputError(f"tile is not square ({image.shape[0]}x{image.shape[1]} px); "
                         "rotations by 90° need square tiles", path)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise InputError("tile has NaN or infinite pixel values", path)
        scale = 255.0 if image.max() <= 1.0 else 1.0
        return np.clip(np.rint(image * scale), 0, 255).astype(np.uint8)
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    raise InputError(f"unsupported pixel type {image.dtype}", path)


def load_class_folders(root: str | Path, *, max_per_class: int | None = None, seed: int = 0) -> TileSet:
    """Tiles from `root/<CLASS>/*.tif`. All tiles must share one size; empty class folders are errors."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError("no class folders found (expected <CLASS>/<tile>.tif)", root)
    names = [p.name for p in folders]
    known = [c for c in NCT_CLASSES if c in names] if set(names) <= set(NCT_CLASSES) else None
    class_names = known or names
    images, labels, sources, size = [], [], [], None
    rng = np.random.default_rng(seed)
    for label, name in enumerate(class_names):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError("empty class folder: no .tif tiles", folder)
        if max_per_class is not None and len(files) > max_per_class:
            files = [files[i] for i in np.sort(rng.choice(len(files), max_per_class, replace=False))]
        for f in files:
            tile = read_tile(f)
            if size is None:
                size = tile.shape
            elif tile.shape != size:
                raise InputError(f"tile size {tile.shape[0]}x{tile.shape[1]} differs from the other tiles "
                                 f"({size[0]}x{size[1]})", f)
            images.append(tile)
            labels.append(label)
            sources.append(str(f))
    return TileSet(np.stack(images), np.asarray(labels), class_names, sources)


def load_medmnist_npz(path: str | Path, split: str = "all") -> TileSet:
    """MedMNIST npz (`train_images`, `val_images`, `test_images` + labels); `split` picks one or all."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"not a readable npz file ({_first_line(e)})", path) from None
    splits = sorted({k[:-len("_images")] for k in keys if k.endswith("_images")})
    if split != "all":
        splits = [s for s in splits if s == split]
    pairs = [(f"{s}_images", f"{s}_labels") for s in splits if f"{s}_labels" in keys]
    if not pairs:
        raise InputError(f"npz has no '<split>_images' / '<split>_labels' arrays"
                         f"{'' if split == 'all' else f' for split {split!r}'} (found: {', '.join(sorted(keys)) or 'nothing'})",
                         path)
    images, labels, sources = [], [], []
    for ik, lk in pairs:
        try:
            im, lab = data[ik], data[lk]
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise InputError(f"array {ik!r} or {lk!r} is unreadable ({_first_line(e)})", path) from None
        if im.ndim != 4 or im.shape[-1] != 3:
            raise InputError(f"{ik} has shape {im.shape}, expected (N, H, W, 3) RGB tiles", path)
        lab = np.asarray(lab).reshape(-1)
        if len(lab) != len(im):
            raise InputError(f"{ik} has {len(im)} tiles but {lk} has {len(lab)} labels", path)
        if np.issubdtype(im.dtype, np.floating) and not np.all(np.isfinite(im)):
            raise InputError(f"{ik} has NaN or infinite pixel values", path)
        images.append(np.stack([_as_rgb_uint8(t, path) for t in im]) if im.dtype != np.uint8 else im)
        if im.shape[1] != im.shape[2]:
            raise InputError(f"{ik} tiles are not square ({im.shape[1]}x{im.shape[2]})", path)
        labels.append(lab.astype(int))
        sources += [f"{path}:{ik}[{i}]" for i in range(len(im))]
    images, labels = np.concatenate(images), np.concatenate(labels)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if labels.min(initial=0) < 0:
        raise InputError("negative class labels", path)
    class_names = PATHMNIST_CLASSES if n_classes <= 9 and "path" in path.name.lower() else [str(i) for i in range(n_classes)]
    return TileSet(images, labels, list(class_names[:max(n_classes, 0)]), sources)


def load_hmnist_csv(path: str | Path) -> TileSet:
    """Kaggle "Colorectal Histology MNIST" `hmnist_<S>_<S>_RGB.csv`: pixel columns then label 1–8."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, StopIteration, csv.Error) as e:
        raise InputError(f"not a readable CSV ({_first_line(e)})", path) from None
    n_pix = len(header) - 1
    side = int(round((n_pix / 3) ** 0.5))
    if header[-1].strip().lower() != "label" or side * side * 3 != n_pix:
        raise InputError("not an hmnist RGB CSV (expected pixel0000… columns for S×S×3 values, then 'label')", path)
    try:
        data = np.asarray(rows, dtype=np.float64)
    except ValueError:
        raise InputError("non-numeric values in pixel or label columns", path) from None
    if data.ndim != 2 or data.shape[1] != n_pix + 1:
        raise InputError("rows have differing numbers of columns", path)
    if not np.all(np.isfinite(data)):
        raise InputError("NaN or infinite values", path)
    images = np.clip(data[:, :-1], 0, 255).astype(np.uint8).reshape(-1, side, side, 3)
    labels = data[:, -1].astype(int) - 1
    if labels.min() < 0 or labels.max() >= len(KATHER2016_CLASSES):
        raise InputError("labels outside 1..8", path)
    return TileSet(images, labels, list(KATHER2016_CLASSES), [f"{path}:row{i + 2}" for i in range(len(images))])


def load_tiles(path: str | Path, *, split: str = "all", max_per_class: int | None = None, seed: int = 0) -> TileSet:
    """Load any supported layout (folder of class folders, MedMNIST npz, hmnist CSV, or a single tile)."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_dir():
        tiles = load_class_folders(path, max_per_class=max_per_class, seed=seed)
    elif path.suffix.lower() == ".npz":
        tiles = load_medmnist_npz(path, split)
    elif path.suffix.lower() == ".csv" or re.match(r"hmnist_\d+_\d+_rgb", path.name.lower()):
        tiles = load_hmnist_csv(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        tile = read_tile(path)
        tiles = TileSet(tile[None], np.array([-1]), [], [str(path)])
    else:
        raise InputError("unknown data layout: expected a folder of class folders, a MedMNIST .npz or an "
                         "hmnist .csv", path)
    if len(tiles) == 0:
        raise InputError("no tiles found", path)
    return tiles


# ----------------------------------------------------------------------------------------- preprocessing

def resize_tiles(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 → (N, size, size, 3) float32 in [0, 1], anti-aliased when shrinking.

    Each channel is resampled as a float image: Pillow's 8-bit path rounds between its horizontal
    and vertical passes, which makes resize(rotate(x)) differ from rotate(resize(x)) by up to a
    grey level, enough to break the exact rotation invariance of the averaged kernels end to end.
    """
    if images.shape[1] == size and images.shape[2] == size:
        return images.astype(np.float32) / 255.0
    from PIL import Image

    # LANCZOS in Pillow widens its filter by the shrink factor, i.e. it low-passes before sampling.
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, tile in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(tile[..., c], dtype=np.float32), mode="F")
            out[i, ..., c] = np.asarray(channel.resize((size, size), Image.Resampling.LANCZOS))
    return np.clip(out, 0, 255) / 255.0


@dataclass
class Preprocessing:
    """Resize to `size` and standardise channels with `mean`, `std` fitted on training tiles."""

    size: int
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, images: np.ndarray, size: int) -> "Preprocessing":
        resized = resize_tiles(images, size).astype(np.float64)  # float32 sums drift by ~1e-5 here
        mean = resized.mean(axis=(0, 1, 2))
        std = resized.std(axis=(0, 1, 2))
        return cls(size, mean.astype(np.float64), np.where(std > 1e-6, std, 1.0).astype(np.float64))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        resized = resize_tiles(images, self.size)
        return ((resized - self.mean.astype(np.float32)) / self.std.astype(np.float32)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["size"]), np.asarray(d["mean"], float), np.asarray(d["std"], float))


def stratified_split(labels: np.ndarray, n_train: int, n_test: int | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split: (train indices, test indices), both sorted.

    Each class gets a share of `n_train` proportional to its size (largest remainders, at least one
    tile per class when possible); the test set is the rest, or `n_test` of it, stratified likewise.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < n_train < n:
        raise InputError(f"--n-train must be between 1 and {n - 1} for {n} tiles, got {n_train}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    train_counts = _allocate(np.array([len(per_class[c]) for c in classes]), n_train)
    train = np.concatenate([per_class[c][:k] for c, k in zip(classes, train_counts)])
    rest = {c: per_class[c][k:] for c, k in zip(classes, train_counts)}
    if n_test is None or n_test >= sum(len(v) for v in rest.values()):
        test = np.concatenate(list(rest.values()))
    else:
        test_counts = _allocate(np.array([len(rest[c]) for c in classes]), n_test)
        test = np.concatenate([rest[c][:k] for c, k in zip(classes, test_counts)])
    return np.sort(train), np.sort(test)


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over groups proportionally to `sizes` (largest remainder), ≥1 each when possible."""
    share = sizes / sizes.sum() * total
    counts = np.floor(share).astype(int)
    if total >= len(sizes):
        counts = np.maximum(counts, np.minimum(1, sizes))
    while counts.sum() > total:
        counts[np.argmax(counts - share)] -= 1
    order = np.argsort(-(share - counts))
    i = 0
    while counts.sum() < total:
        c = order[i % len(order)]
        if counts[c] < sizes[c]:
            counts[c] += 1
        i += 1
    return np.minimum(counts, sizes)
