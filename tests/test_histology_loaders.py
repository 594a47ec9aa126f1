"""Histology loaders on the bundled real tiles, preprocessing and splits, and every bad input."""
import shutil

import numpy as np
import pytest
import tifffile

from eqkernels.datasets import KATHER2016_8X8, NCT_CRC_SAMPLE, PATHMNIST_SAMPLE
from eqkernels.errors import InputError
from eqkernels.pipelines.histology import (NCT_CLASSES, Preprocessing, load_tiles, read_tile, resize_tiles,
                                           stratified_split)


def test_pathmnist_npz(pathmnist):
    assert pathmnist.images.shape == (718, 28, 28, 3) and pathmnist.images.dtype == np.uint8
    assert np.bincount(pathmnist.labels).tolist() == [147, 78, 26, 60, 112, 60, 85, 28, 122]
    assert pathmnist.class_names == NCT_CLASSES
    # Real H&E colours: the mean is pinkish-purple (PROVENANCE: mean RGB (187, 140, 182)).
    assert np.allclose(pathmnist.images.reshape(-1, 3).mean(0), [187, 140, 182], atol=2)


def test_nct_tiff_class_folders():
    tiles = load_tiles(NCT_CRC_SAMPLE)
    assert tiles.images.shape == (9, 224, 224, 3)
    assert tiles.class_names == NCT_CLASSES and tiles.labels.tolist() == list(range(9))
    assert tiles.sources[0].endswith("ADI-AAQEFMRI.tif")
    # Background tiles are bright, tissue tiles darker.
    brightness = tiles.images.mean(axis=(1, 2, 3))
    assert brightness[NCT_CLASSES.index("BACK")] > brightness[NCT_CLASSES.index("TUM")]


def test_kather_hmnist_csv():
    tiles = load_tiles(KATHER2016_8X8)
    assert tiles.images.shape == (5000, 8, 8, 3)
    assert np.bincount(tiles.labels).tolist() == [625] * 8
    assert tiles.class_names[0] == "01_TUMOR" and tiles.class_names[-1] == "08_EMPTY"
    # EMPTY is near-white ([242, 242, 242] per PROVENANCE).
    assert np.allclose(tiles.images[tiles.labels == 7].reshape(-1, 3).mean(0), 242, atol=3)


def test_kather_2016_folder_layout(tmp_path):
    """The original Kather-2016 folders (01_TUMOR … 08_EMPTY) load with their own class names."""
    tiles = load_tiles(KATHER2016_8X8)
    for label, name in enumerate(tiles.class_names):
        (tmp_path / name).mkdir()
        for i in np.flatnonzero(tiles.labels == label)[:2]:
            tifffile.imwrite(tmp_path / name / f"{name}_{i}.tif", tiles.images[i])
    back = load_tiles(tmp_path)
    assert back.class_names == tiles.class_names and np.bincount(back.labels).tolist() == [2] * 8


def test_stratified_split_is_deterministic_and_proportional(pathmnist):
    a_train, a_test = stratified_split(pathmnist.labels, 100, seed=3)
    b_train, b_test = stratified_split(pathmnist.labels, 100, seed=3)
    c_train, _ = stratified_split(pathmnist.labels, 100, seed=4)
    assert np.array_equal(a_train, b_train) and not np.array_equal(a_train, c_train)
    assert len(a_train) == 100 and len(a_test) == 618 and not set(a_train) & set(a_test)
    counts = np.bincount(pathmnist.labels[a_train], minlength=9)
    expected = np.bincount(pathmnist.labels) / 718 * 100
    assert np.all(np.abs(counts - expected) <= 1) and counts.min() >= 1


def test_preprocessing_fitted_on_training_tiles_only(pathmnist):
    train = pathmnist.images[:50]
    prep = Preprocessing.fit(train, 16)
    x = prep(train)
    assert x.shape == (50, 16, 16, 3)
    assert np.allclose(x.mean(axis=(0, 1, 2)), 0, atol=1e-5) and np.allclose(x.std(axis=(0, 1, 2)), 1, atol=1e-4)
    other = prep(pathmnist.images[50:100])
    assert not np.allclose(other.mean(axis=(0, 1, 2)), 0, atol=1e-3)  # not re-fitted on other tiles
    assert Preprocessing.from_dict(prep.to_dict()).mean.tolist() == prep.mean.tolist()


def test_resize_is_anti_aliased():
    """A one-pixel checkerboard averages to grey when shrunk, instead of aliasing to black or white."""
    board = (np.indices((224, 224)).sum(0) % 2 * 255).astype(np.uint8)
    small = resize_tiles(np.repeat(board[None, ..., None], 3, -1), 28)
    assert np.allclose(small, 0.5, atol=0.05)


def test_resize_commutes_with_rotation(pathmnist):
    tile = load_tiles(NCT_CRC_SAMPLE).images[:2]
    a = resize_tiles(np.rot90(tile, 1, axes=(1, 2)), 28)
    b = np.rot90(resize_tiles(tile, 28), 1, axes=(1, 2))
    assert np.max(np.abs(a - b)) < 1e-6  # exact up to float rounding (no 8-bit intermediate)


# --------------------------------------------------------------------------------- bad input

def nct_copy(tmp_path):
    root = tmp_path / "nct"
    shutil.copytree(NCT_CRC_SAMPLE, root, ignore=shutil.ignore_patterns("*.md"))
    return root


def one_line_error(excinfo, must_contain: str):
    message = str(excinfo.value)
    assert "\n" not in message and must_contain in message, message


def test_truncated_tiff_names_the_file(tmp_path):
    root = nct_copy(tmp_path)
    bad = root / "TUM" / "TUM-AACHEHDV.tif"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(InputError, match="corrupt or truncated TIFF") as e:
        load_tiles(root)
    one_line_error(e, "TUM-AACHEHDV.tif")


def test_garbage_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"this is not a tiff")
    with pytest.raises(InputError, match="not a TIFF") as e:
        read_tile(path)
    one_line_error(e, "x.tif")


@pytest.mark.parametrize("array,problem", [
    (np.zeros((20, 20), np.uint8), "not an RGB tile"),
    (np.zeros((20, 20, 4), np.uint8), "not an RGB tile"),
    (np.zeros((20, 24, 3), np.uint8), "not square"),
    (np.full((20, 20, 3), np.nan, np.float32), "NaN"),
])
def test_wrong_tiles(tmp_path, array, problem):
    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, array)
    with pytest.raises(InputError, match=problem) as e:
        read_tile(path)
    one_line_error(e, "tile.tif")


def test_tile_of_a_different_size_in_a_folder(tmp_path):
    root = nct_copy(tmp_path)
    tifffile.imwrite(root / "MUS" / "MUS-small.tif", np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(InputError, match="differs from the other tiles") as e:
        load_tiles(root)
    one_line_error(e, "MUS-small.tif")


def test_empty_class_folder(tmp_path):
    root = nct_copy(tmp_path)
    for f in (root / "DEB").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="empty class folder") as e:
        load_tiles(root)
    one_line_error(e, "DEB")


def test_npz_without_expected_arrays(tmp_path):
    path = tmp_path / "pathmnist.npz"
    np.savez(path, images=np.zeros((3, 28, 28, 3), np.uint8))
    with pytest.raises(InputError, match="_images") as e:
        load_tiles(path)
    one_line_error(e, "pathmnist.npz")
    np.savez(path, train_images=np.zeros((3, 28, 28, 3), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(InputError, match="3 tiles but train_labels has 2"):
        load_tiles(path)
    path.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(InputError, match="not a readable npz"):
        load_tiles(path)


def test_unknown_layout_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="unknown data layout"):
        load_tiles(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        load_tiles(tmp_path / "nothing")
    with pytest.raises(InputError, match="no class folders"):
        load_tiles(tmp_path)
