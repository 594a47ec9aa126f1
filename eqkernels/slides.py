"""Whole-slide images read lazily: pyramidal TIFF, OME-TIFF, SVS, NDPI (tifffile + zarr), other vendor formats
through OpenSlide (optional extra), small PNG/JPEG images through Pillow; tissue detection on a thumbnail.

A `Slide` exposes its pyramid levels as (height, width) in pixels with their downsample factors
relative to level 0, the physical resolution of level 0 in microns per pixel (µm/px) when the file
records it, and `read(level, y, x, h, w)` → (h, w, 3) uint8 RGB. Tiled TIFF levels are opened as
zarr arrays over the file, so a read decodes only the TIFF tiles it touches and a level is never
held in memory whole; `thumbnail` reduces a level block by block for the same reason.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels.errors import InputError

PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg"}
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".qptiff"}
# Pillow reads these whole; a slide-sized PNG belongs in a pyramidal TIFF instead.
PILLOW_MAX_PIXELS = 64_000_000
CM_PER_INCH = 2.54
THUMBNAIL_BLOCK_PX = 2048  # level pixels per side read at once for thumbnails (12 MB of RGB)


@dataclass
class Slide:
    """One open slide: levels (height, width), downsamples (≥ 1, level 0 first), mpp of level 0 (µm/px)."""

    path: Path
    levels: list[tuple[int, int]]
    downsamples: list[float]
    mpp: float | None
    mpp_source: str
    backend: str
    _readers: list = field(default_factory=list, repr=False)
    _handle: object = field(default=None, repr=False)

    def level_mpp(self, level: int) -> float:
        """µm per pixel of `level` (requires the level-0 mpp)."""
        if self.mpp is None:
            raise InputError("the slide's resolution (µm per pixel) is unknown; give it with --mpp", self.path)
        return self.mpp * self.downsamples[level]

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) of `level` as (h, w, 3) uint8; outside the level reads as white."""
        height, width = self.levels[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
        if y1 <= y0 or x1 <= x0:
            return out
        try:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._readers[level](y0, x0, y1, x1)
        except InputError:
            raise
        except Exception as e:  # decoders raise many types for damaged data
            raise InputError(f"cannot decode level {level} at ({y0}, {x0}): {type(e).__name__}: "
                             f"{_first_line(e)}", self.path) from None
        return out

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, float]:
        """The slide reduced about `downsample`× from level 0: (image (h, w, 3) uint8, actual downsample).

        Takes the coarsest level not coarser than asked and averages f×f blocks of it, reading
        blocks of about THUMBNAIL_BLOCK_PX² level pixels, so memory stays near the size of the result.
        """
        level = max((i for i, d in enumerate(self.downsamples) if d <= downsample * (1 + 1e-6)), default=0)
        factor = max(int(downsample / self.downsamples[level] + 1e-6), 1)
        height, width = self.levels[level]
        th, tw = max(height // factor, 1), max(width // factor, 1)
        out = np.empty((th, tw, 3), dtype=np.uint8)
        step = max(1, THUMBNAIL_BLOCK_PX // factor)  # thumbnail pixels per block side
        for r in range(0, th, step):
            for c in range(0, tw, step):
                rows, cols = min(step, th - r), min(step, tw - c)
                block = self.read(level, r * factor, c * factor, rows * factor, cols * factor).astype(np.float32)
                out[r:r + rows, c:c + cols] = np.rint(block.reshape(rows, factor, cols, factor, 3).mean(axis=(1, 3)))
        return out, self.downsamples[level] * factor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else "no detail"


# -------------------------------------------------------------------------------------------- opening

READERS = ("auto", "tifffile", "openslide", "pillow")


def open_slide(path: str | Path, mpp: float | None = None, reader: str = "auto") -> Slide:
    """Open a slide lazily; `mpp` (µm/px of level 0) overrides what the file says.

    `reader` "auto" picks tifffile for TIFF files (pyramidal TIFF, OME-TIFF, SVS, NDPI), Pillow
    for PNG/JPEG and OpenSlide for anything else; naming one forces it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a folder, not a slide file", path)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"--mpp must be a positive number of µm per pixel, got {mpp}")
    if reader not in READERS:
        raise InputError(f"--reader must be one of {', '.join(READERS)}, got {reader!r}")
    suffix = path.suffix.lower()
    if reader == "auto":
        reader = "pillow" if suffix in PILLOW_SUFFIXES else "tifffile" if suffix in TIFF_SUFFIXES else "openslide"
    if reader == "tifffile" and not _is_tiff(path):
        raise InputError("corrupt slide: the file does not start with a TIFF header", path)
    opener = {"tifffile": _open_tiff, "pillow": _open_pillow, "openslide": _open_openslide}[reader]
    slide = opener(path)
    if mpp is not None:
        slide.mpp, slide.mpp_source = float(mpp), "--mpp"
    return slide


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] in (b"II", b"MM")


def _open_tiff(path: Path) -> Slide:
    """Pyramidal TIFF / OME-TIFF / SVS / NDPI through tifffile, each level a zarr array over the file."""
    import tifffile
    import zarr

    logging.getLogger("tifffile").setLevel(logging.ERROR)  # our one line is the message the user sees
    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        levels = list(series.levels)
        _check_not_truncated(path, levels)
        arrays = [zarr.open(tif.aszarr(series=0, level=i), mode="r") for i in range(len(levels))]
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"corrupt or truncated TIFF ({type(e).__name__}: {_first_line(e)})", path) from None
    readers, shapes = [], []
    for level, array in zip(levels, arrays):
        reader, shape = _yxs_reader(array, level.axes, path)
        readers.append(reader)
        shapes.append(shape)
    downsamples = [shapes[0][1] / s[1] for s in shapes]
    mpp, source = _tiff_mpp(tif)
    return Slide(path, shapes, downsamples, mpp, source, f"tifffile ({series.kind or 'tiff'})", readers, tif)


def _check_not_truncated(path: Path, levels) -> None:
    """Refuse a file whose image data runs past its end (a cut download) before any pixel is read."""
    size = path.stat().st_size
    for level in levels:
        for page in level.pages:
            if page is None:
                continue
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                raise InputError(f"truncated slide: image data runs to byte {max(ends):,} of a "
                                 f"{size:,}-byte file", path)


def _yxs_reader(array, axes: str, path: Path):
    """A reader (y0, x0, y1, x1) → (h, w, 3) uint8 for a level with axes like YXS, SYX, CYX or ZYXS."""
    axes = axes.upper().replace("C", "S")
    if array.dtype != np.uint8:
        raise InputError(f"pixels are {array.dtype}; slides must be 8-bit RGB", path)
    lead = [i for i, a in enumerate(axes) if a not in "YXS"]
    if any(array.shape[i] != 1 for i in lead) or "Y" not in axes or "X" not in axes:
        raise InputError(f"unsupported slide layout (axes {axes}, shape {tuple(array.shape)}); expected one RGB "
                         "plane", path)
    keep = "".join(a for a in axes if a in "YXS")
    if "S" not in keep or array.shape[axes.index("S")] != 3:
        raise InputError(f"not an RGB slide (axes {axes}, shape {tuple(array.shape)})", path)
    yi, xi = axes.index("Y"), axes.index("X")
    shape = (int(array.shape[yi]), int(array.shape[xi]))
    order = [keep.index(a) for a in "YXS"]

    def read(y0, x0, y1, x1):
        index = [0] * len(axes)
        index[yi], index[xi], index[axes.index("S")] = slice(y0, y1), slice(x0, x1), slice(None)
        return np.transpose(np.asarray(array[tuple(index)]), order)

    return read, shape


def _tiff_mpp(tif) -> tuple[float | None, str]:
    """Level-0 µm/px from OME-XML, the Aperio description, or the TIFF resolution tags (cm or inch)."""
    if tif.is_ome and tif.ome_metadata:
        found = _ome_mpp(tif.ome_metadata)
        if found:
            return found, "OME-XML PhysicalSizeX"
    page = tif.pages.first
    description = page.description or ""
    if tif.is_svs or description.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)), "Aperio MPP"
    try:
        xres = page.resolution[0]
        unit = int(page.resolutionunit)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None, "none"
    # ResolutionUnit 2 = inch, 3 = centimetre; 1 (none) carries no physical scale.
    per_cm = {2: 1 / CM_PER_INCH, 3: 1.0}.get(unit)
    if per_cm is None or not xres or xres <= 1:
        return None, "none"
    return 1e4 / (xres * per_cm), "TIFF resolution tags"


def _ome_mpp(xml: str) -> float | None:
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    if not m:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    scale = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm")
    value = float(m.group(1))
    return value * scale if scale and value > 0 else None


def _open_pillow(path: Path) -> Slide:
    """A small PNG/JPEG image as a one-level slide (read whole: Pillow cannot read regions lazily)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > PILLOW_MAX_PIXELS:
                raise InputError(f"{im.width}×{im.height} px is too large for a PNG/JPEG slide; "
                                 "convert it to a pyramidal TIFF", path)
            image = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"corrupt or truncated image ({type(e).__name__}: {_first_line(e)})", path) from None
    reader = lambda y0, x0, y1, x1: image[y0:y1, x0:x1]  # noqa: E731
    return Slide(path, [image.shape[:2]], [1.0], None, "none", "pillow", [reader])


def _open_openslide(path: Path) -> Slide:
    """Vendor formats (MRXS, SCN, VMS, ...) through OpenSlide, if the optional extra is installed."""
    try:
        import openslide
    except ImportError:
        raise InputError("not a TIFF/SVS/NDPI/PNG slide; other vendor formats need the optional OpenSlide extra "
                         "(pip install 'eqkernels[openslide]')", path) from None
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as e:
        raise InputError(f"OpenSlide cannot read it ({type(e).__name__}: {_first_line(e)})", path) from None
    shapes = [(h, w) for w, h in osr.level_dimensions]
    downsamples = [float(d) for d in osr.level_downsamples]

    def reader_for(level):
        def read(y0, x0, y1, x1):
            d = downsamples[level]  # OpenSlide takes the location in level-0 coordinates
            region = osr.read_region((int(round(x0 * d)), int(round(y0 * d))), level, (x1 - x0, y1 - y0))
            rgba = np.asarray(region)
            # Transparent pixels (outside scanned areas) are glass: white.
            return np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8)
        return read

    mpp = osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
    mpp_value = float(mpp) if mpp else None
    return Slide(path, shapes, downsamples, mpp_value, "OpenSlide mpp-x" if mpp_value else "none", "openslide",
                 [reader_for(i) for i in range(len(shapes))], osr)


# ------------------------------------------------------------------------------------------ tissue

def optical_density(image: np.ndarray) -> np.ndarray:
    """Mean optical density over the RGB channels, −ln((I + 1) / 256): (h, w) float32, 0 for white."""
    return -np.log((image.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of a histogram of `values` (Otsu 1979)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = w0[-1] + counts[-1] - w0
    s0 = np.cumsum(counts * centres)[:-1]
    m0, m1 = s0 / np.maximum(w0, 1), (np.sum(counts * centres) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:-1][np.argmax(between)])


def tissue_mask(thumb: np.ndarray, floor: float = 0.06, ceiling: float = 0.08) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB thumbnail (h, w, 3): optical density above an Otsu threshold, clipped.

    Otsu separates glass from tissue when both are present; the clip keeps it meaningful when
    they are not: `floor` (OD 0.06, a grey level of about 240) keeps glass out on an all-glass
    slide (NCT background tiles: grey 244, OD 0.044, with dust specks), and `ceiling` (OD 0.08,
    about 236) keeps faint tissue in when tissue fills most of the slide and Otsu would split the
    stains instead (NCT-CRC-HE-100K fat and mucus tiles average grey 227-230; with Otsu alone,
    0.8 on the assembled test slide, mucus is lost). On slides with much glass and tissue the
    Otsu cut lies above the ceiling, so the threshold is in effect OD 0.08; glass darker than
    grey ~236 would count as tissue.
    Returns (mask (h, w), threshold).
    """
    od = optical_density(thumb)
    threshold = float(np.clip(otsu_threshold(od), floor, ceiling))
    return od > threshold, threshold


# ----------------------------------------------------------------------------------------- writing

def downsample2(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 → (h // 2, w // 2, 3): the rounded mean of each 2×2 block."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, 3)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def write_pyramidal_tiff(image: np.ndarray, path: str | Path, mpp: float, *, levels: int = 3, tile: int = 256,
                         flavour: str = "tiff", compression: str = "zlib") -> Path:
    """Write (H, W, 3) uint8 as a tiled pyramid (each level halves the last) with its resolution.

    flavour "tiff": levels as SubIFDs, resolution tags in pixels per cm; "ome": OME-TIFF with
    PhysicalSizeX/Y in µm; "svs": Aperio-style pages (baseline, thumbnail, levels) with `MPP =`
    in the description.
    """
    import tifffile

    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(downsample2(pyramid[-1]))
    path = Path(path)
    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    opts = dict(photometric="rgb", tile=(tile, tile), compression=compression)
    with tifffile.TiffWriter(path, bigtiff=False, ome=(flavour == "ome")) as tw:
        if flavour == "svs":
            h, w = image.shape[:2]
            desc = (f"Aperio Image Library eqkernels\r\n{w}x{h} ({tile}x{tile}) RGB|AppMag = 20|MPP = {mpp}")
            tw.write(image, description=desc, metadata=None, **opts, **res)
            tw.write(pyramid[-1], photometric="rgb", description="Aperio thumbnail", metadata=None, **res)
            for i, level in enumerate(pyramid[1:], start=1):
                tw.write(level, description=f"Aperio level {i}", metadata=None, **opts, **res)
            return path
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm"} if flavour == "ome" else None
        tw.write(image, subifds=levels - 1, metadata=meta, **opts, **res)
        for i, level in enumerate(pyramid[1:], start=1):
            tw.write(level, subfiletype=1, **opts, resolution=(1e4 / (mpp * 2 ** i),) * 2,
                     resolutionunit="CENTIMETER")
    return path
