"""`eqk histology map` on a slide assembled from real 224 px tiles in a known layout, and its bad inputs.

The slide (3 × 4 tiles, 0.5 µm/px, pyramid levels 1, 2, 4) holds the nine bundled NCT-CRC-HE-100K
tiles, the two CRC-VAL-HE-7K stroma tiles of shared/data (glass without them) and glass. The
test model is trained on those same tiles at 2 µm/px (each 224 px tile reduced by two 2×2 block
means to 56 px, as the pyramid's level 2 is made), so a map that reads the right level and the
right places must reproduce the layout and, up to the ridge, the training targets; a grid off by
a few pixels or a wrong level gives other pixels and other scores.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from eqkernels.datasets import NCT_CRC_SAMPLE
from eqkernels.pipelines.histology import NCT_CLASSES, TileSet, read_tile
from eqkernels.pipelines.histology_map import NCT_MPP, assemble_test_slide
from eqkernels.slides import downsample2, write_pyramidal_tiff
from tests.conftest import SHARED_DATA
from tests.conftest import one_line_error as _one_line_error

STR_EXTRA = sorted((Path(SHARED_DATA) / "histology" / "crc_val_he_7k_sample" / "STR").glob("*.tif"))
TILE_AREA_MM2 = (224 * NCT_MPP * 1e-3) ** 2  # one 112 µm tile


def _layout_tiles(layout) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """The source tiles of a layout, read from their own files: (N, 224, 224, 3), names, cells."""
    extra, used, images, names, cells = list(STR_EXTRA), set(), [], [], []
    for r, row in enumerate(layout):
        for c, name in enumerate(row):
            if name is None:
                continue
            path = extra.pop(0) if name in used else next((NCT_CRC_SAMPLE / name).glob("*.tif"))
            used.add(name)
            images.append(read_tile(path))
            names.append(name)
            cells.append((r, c))
    return np.stack(images), names, cells


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    path = folder / "slide.tif"
    layout = assemble_test_slide(path, extra_str=STR_EXTRA)
    return path, layout


@pytest.fixture(scope="module")
def model_path(slide, tmp_path_factory):
    """A C4-averaged kernel model trained on the slide's own tiles at 2 µm/px (56 px), 16 px input."""
    from eqkernels.kernels import ConvNetSpec, KernelSpec
    from eqkernels.pipelines.histology_model import train_model

    images, names, _ = _layout_tiles(slide[1])
    small = np.stack([downsample2(downsample2(t)) for t in images])
    tiles = TileSet(small, np.array([NCT_CLASSES.index(n) for n in names]), list(NCT_CLASSES))
    model, _ = train_model(KernelSpec("cnn-c4avg", ConvNetSpec()), tiles, size=16, ridge=1e-6, progress=False,
                           options={"train_mpp": 4 * NCT_MPP, "train_tile_px": 56})
    return model.save(tmp_path_factory.mktemp("model") / "layout.h5")


def _cells(out: Path) -> dict:
    """{(row, col): (class, scores)} from the GeoJSON, cells from the level-0 polygon corners."""
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    found = {}
    for f in features:
        x, y = f["geometry"]["coordinates"][0][0]
        props = f["properties"]
        scores = {k[6:]: v for k, v in props["measurements"].items() if k.startswith("score ")}
        found[(int(y // 224), int(x // 224))] = (props["classification"]["name"], scores)
    return found


def test_map_reproduces_the_known_layout_and_areas(slide, model_path, cli, tmp_path):
    """Accuracy per tile 1.0 against the layout; scores = centred one-hot targets.

    Tolerance 1e-3 on the scores: ridge 1e-6 of the mean kernel diagonal leaves residuals of
    1e-5 measured on these 11 tiles (float32 kernels), so the margin is ~100×.
    """
    path, layout = slide
    out = tmp_path / "map"
    result = cli("histology", "map", model_path, path, "--out", out, "--json")
    assert result.code == 0, result
    info = json.loads(result.out)
    assert info["complete"] and info["level"] == 2 and info["tile_px"] == 56 and info["stride_px"] == 56
    assert (info["grid_rows"], info["grid_cols"]) == (3, 4) and info["mpp_source"] == "TIFF resolution tags"
    # BACK (blank NCT background) and glass are not tissue; every other slot is.
    expected = {(r, c): name for r, row in enumerate(layout) for c, name in enumerate(row) if name not in (None, "BACK")}
    cells = _cells(out)
    assert set(cells) == set(expected)
    accuracy = np.mean([cells[k][0] == name for k, name in expected.items()])
    assert accuracy == 1.0
    for key, name in expected.items():
        target = {n: (1 if n == name else 0) - 1 / 9 for n in NCT_CLASSES}
        assert max(abs(cells[key][1][n] - target[n]) for n in NCT_CLASSES) < 1e-3
    areas = {row["class"]: row for row in json.loads((out / "areas.json").read_text())["areas"]}
    for name in NCT_CLASSES:
        n = sum(1 for v in expected.values() if v == name)
        assert areas[name]["tiles"] == n
        assert areas[name]["area_mm2"] == pytest.approx(n * TILE_AREA_MM2, rel=1e-12)
        assert areas[name]["percent_of_tissue"] == pytest.approx(100 * n / len(expected))
    assert (out / "areas.csv").read_text().splitlines()[0] == "class,tiles,area_mm2,percent_of_tissue"
    assert "| STR (cancer-associated stroma) |" in (out / "areas.md").read_text()
    for png in ("class_map.png", "uncertainty.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "PARTIAL.txt").exists() and not (out / ".checkpoint").exists()


def test_rotation_check_equals_mapping_the_rotated_slide(slide, model_path, cli, tmp_path):
    """--check-rotation on the slide vs. an independent map of the slide rotated by 90° (a new file).

    Invariant kernel: 0 tiles change class. Scores agree to 1e-4 relative: the C4-averaged kernel
    is invariant to ~1e-7, amplified by the ridge solve (as in test_histology_cli).
    """
    path, layout = slide
    rotated = tmp_path / "rotated.tif"
    rotated_layout = assemble_test_slide(rotated, extra_str=STR_EXTRA, rotate=1)
    checked = cli("histology", "map", model_path, path, "--out", tmp_path / "a", "--check-rotation", "--json")
    assert checked.code == 0, checked
    rot = json.loads(checked.out)["rotation_check"]
    assert rot["tiles"] == 10 and rot["tiles_changed"] == 0 and rot["fraction_changed"] == 0.0
    other = cli("histology", "map", model_path, rotated, "--out", tmp_path / "b")
    assert other.code == 0, other
    a, b = _cells(tmp_path / "a"), _cells(tmp_path / "b")
    cols = len(layout[0])
    # np.rot90 (counter-clockwise): cell (r, c) of the slide is cell (cols − 1 − c, r) of the rotated one.
    assert set(b) == {(cols - 1 - c, r) for r, c in a}
    for (r, c), (name, scores) in a.items():
        assert b[(cols - 1 - c, r)][0] == name == rotated_layout[cols - 1 - c][r]
        top = max(abs(v) for v in scores.values())
        assert max(abs(scores[n] - b[(cols - 1 - c, r)][1][n]) for n in scores) < 1e-4 * top


def test_interrupted_map_is_marked_partial_and_resumes(slide, model_path, cli, tmp_path, monkeypatch):
    """Ctrl-C after the first batch: a partial map marked PARTIAL; the rerun predicts only the rest."""
    from eqkernels.pipelines import histology_map

    path, _ = slide
    real, calls, interrupt = histology_map._predict_batch, [], [True]

    def interrupt_second(predictor, images, rotation):
        calls.append(len(images))
        if interrupt[0] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(predictor, images, rotation)

    monkeypatch.setattr(histology_map, "_predict_batch", interrupt_second)
    out = tmp_path / "map"
    first = cli("histology", "map", model_path, path, "--out", out, "--batch", "5")
    assert first.code == 130 and "PARTIAL" in first.err
    assert (out / "PARTIAL.txt").exists() and (out / "areas.md").read_text().startswith("# PARTIAL")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["tiles_done"] == 5 and summary["tissue_tiles"] == 10
    assert len(_cells(out)) == 5 and json.loads((out / "areas.json").read_text())["complete"] is False
    calls.clear()
    interrupt[0] = False
    second = cli("histology", "map", model_path, path, "--out", out, "--batch", "5", "--json")
    assert second.code == 0, second
    assert calls == [5]  # the second batch only
    info = json.loads(second.out)
    assert info["complete"] and info["tiles_resumed"] == 5 and info["tiles_predicted"] == 5
    assert not (out / "PARTIAL.txt").exists() and len(_cells(out)) == 10


def test_ensemble_map_is_the_members_mean_on_the_source_tiles(slide, cli, tmp_path):
    """An ensemble file: each cell's scores equal the ensemble applied to its source tile's file.

    Same pixels (level 2 = two 2×2 block means, as done to the source tile here), same float32
    network; 1e-5 absolute covers batch-composition differences in XLA's reductions (measured 0).
    """
    from eqkernels.ensembles import EnsembleSpec
    from eqkernels.kernels import ConvNetSpec
    from eqkernels.pipelines.histology_ensemble import train_histology_ensemble

    path, layout = slide
    images, names, cells = _layout_tiles(layout)
    small = np.stack([downsample2(downsample2(t)) for t in images])
    tiles = TileSet(small, np.array([NCT_CLASSES.index(n) for n in names]), list(NCT_CLASSES))
    # Untrained members (steps=0) suffice: what is tested is where the map reads, not what was learnt.
    spec = EnsembleSpec(net=ConvNetSpec(channels=4), n_outputs=9, members=2, steps=0)
    ensemble = train_histology_ensemble(spec, tiles, size=16, progress=False,
                                        options={"train_mpp": 4 * NCT_MPP, "train_tile_px": 56})
    ensemble.save(tmp_path / "ens.h5")
    result = cli("histology", "map", tmp_path / "ens.h5", path, "--out", tmp_path / "map", "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["uncertainty"] == "members' sd of the winning score"
    found = _cells(tmp_path / "map")
    direct = ensemble.predict(small)
    for k, cell in enumerate(cells):
        if cell in found:
            scores = np.array([found[cell][1][n] for n in NCT_CLASSES])
            np.testing.assert_allclose(scores, direct.scores[k], atol=1e-5)
    assert len(found) == 10




def test_bad_inputs_are_one_line_errors_without_outputs(slide, model_path, cli, tmp_path):
    from eqkernels import store
    from eqkernels.datasets import IHC_SAMPLE

    path, _ = slide
    data = path.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "junk.tif").write_bytes(b"\x00" * 5000)
    back = read_tile(next((NCT_CRC_SAMPLE / "BACK").glob("*.tif")))
    write_pyramidal_tiff(np.tile(back, (2, 2, 1)), tmp_path / "blank.tif", mpp=0.5, levels=2)
    store.save(tmp_path / "kernel.h5", "kernel", {}, {"k": np.zeros(2)})
    cases = [
        ((model_path, tmp_path / "cut.tif"), ("cut.tif", "truncated")),
        ((model_path, tmp_path / "junk.tif"), ("junk.tif", "TIFF header")),
        ((model_path, tmp_path / "blank.tif"), ("blank.tif", "no tissue")),
        ((model_path, IHC_SAMPLE), ("ihc.png", "--mpp")),
        ((model_path, path, "--mpp", "20"), ("too coarse", "5.6 px")),
        ((tmp_path / "kernel.h5", path), ("kernel.h5", "'kernel'")),
        ((model_path, path, "--min-tissue", "1.5"), ("--min-tissue",)),
    ]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        _one_line_error(cli("histology", "map", *args, "--out", out), *words)
        assert not out.exists() or not any(p for p in out.iterdir() if p.name != ".checkpoint"), args


def test_model_without_training_resolution_needs_train_mpp(slide, cli, tmp_path):
    from eqkernels.pipelines.histology_model import HistologyModel

    path, _ = slide
    old = HistologyModel.load(_model_file(tmp_path))
    assert "train_mpp" not in old.options
    _one_line_error(cli("histology", "map", tmp_path / "old.h5", path, "--out", tmp_path / "o"), "--train-mpp")


def _model_file(tmp_path) -> Path:
    """A tiny model trained on PathMNIST through `train_model` without a training resolution."""
    from eqkernels.datasets import PATHMNIST_SAMPLE
    from eqkernels.kernels import KernelSpec
    from eqkernels.pipelines.histology import load_tiles
    from eqkernels.pipelines.histology_model import train_model

    tiles = load_tiles(PATHMNIST_SAMPLE)
    model, _ = train_model(KernelSpec("cnn"), tiles.subset(np.arange(0, 700, 35)), size=8, progress=False)
    return model.save(tmp_path / "old.h5")


def test_train_records_the_training_resolution(cli, tmp_path):
    """PathMNIST: NCT tiles (224 px at 0.5 µm/px) resized to 28 px, i.e. 4 µm/px; --train-mpp overrides."""
    from eqkernels.pipelines.histology_model import HistologyModel

    args = ("histology", "train", "--kernel", "cnn", "--size", "8", "--n-train", "18")
    assert cli(*args, "--out", tmp_path / "a.h5").code == 0
    options = HistologyModel.load(tmp_path / "a.h5").options
    assert options["train_mpp"] == pytest.approx(4.0) and options["train_tile_px"] == 28
    assert cli(*args, "--train-mpp", "3.5", "--out", tmp_path / "b.h5").code == 0
    assert HistologyModel.load(tmp_path / "b.h5").options["train_mpp"] == 3.5


def test_predict_refuses_slides_and_tiny_tiles(slide, model_path, cli, tmp_path):
    import tifffile

    path, _ = slide
    _one_line_error(cli("histology", "predict", model_path, path), "slide.tif", "pyramidal", "eqk histology map")
    pages = tmp_path / "pages.tif"
    tile = read_tile(next((NCT_CRC_SAMPLE / "TUM").glob("*.tif")))
    tifffile.imwrite(pages, np.stack([tile, tile]), photometric="rgb")
    _one_line_error(cli("histology", "predict", model_path, pages), "multi-page", "eqk histology map")
    tifffile.imwrite(tmp_path / "tiny.tif", tile[:7, :7], photometric="rgb")
    _one_line_error(cli("histology", "predict", model_path, tmp_path / "tiny.tif"), "7×7", "16 px")
    tifffile.imwrite(tmp_path / "small.tif", tile[:12, :12], photometric="rgb")
    small = cli("histology", "predict", model_path, tmp_path / "small.tif", "--json")
    assert small.code == 0 and "warning" in small.err and "12×12" in small.err
    assert json.loads(small.out)["tile"].endswith("small.tif")


def test_grid_level_stride_and_overlap(slide):
    """Closed forms: 112 µm tiles on a 0.5 µm/px slide with levels 1, 2, 4 (672 × 896 px at level 0)."""
    from eqkernels.errors import InputError
    from eqkernels.pipelines.histology_map import plan_grid
    from eqkernels.slides import open_slide

    with open_slide(slide[0]) as s:
        g = plan_grid(s, 112.0, 16, train_mpp=4.0)  # PathMNIST: no level is as coarse; the coarsest finer one
        assert (g.level, g.tile, g.stride, g.rows, g.cols) == (2, 56, 56, 3, 4)
        g = plan_grid(s, 112.0, 16, train_mpp=1.0, overlap=0.5)  # level 1 (1 µm/px): rows (336 − 112)/56 + 1
        assert (g.level, g.tile, g.stride, g.rows, g.cols) == (1, 112, 56, 5, 7)
        assert g.cell_area_mm2() == pytest.approx((56 * 1.0 * 1e-3) ** 2)
        g = plan_grid(s, 112.0, 16, train_mpp=0.25)  # finer than the slide: level 0
        assert (g.level, g.tile, g.rows, g.cols) == (0, 224, 3, 4)
        with pytest.raises(InputError, match="overlap"):
            plan_grid(s, 112.0, 16, train_mpp=4.0, overlap=1.0)
