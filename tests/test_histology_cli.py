"""`eqk histology train → predict → report` on real tiles, and bad input through the CLI."""
import json

import numpy as np
import pytest
import tifffile

from eqkernels.datasets import NCT_CRC_SAMPLE, PATHMNIST_SAMPLE
from eqkernels.metrics import orbit_same_predictions
from eqkernels.pipelines.histology import load_tiles
from eqkernels.pipelines.histology_model import HistologyModel

SMALL = ["--size", "12", "--n-train", "40"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A C4-averaged and a plain model trained through the CLI on 40 real tiles."""
    from tests.conftest import CliResult  # noqa: F401 (fixture module import check)
    from eqkernels.apps.cli import main

    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for kernel in ("cnn-c4avg", "cnn"):
        path = folder / f"{kernel}.h5"
        assert main(["histology", "train", "--kernel", kernel, *SMALL, "--out", str(path)]) == 0
        paths[kernel] = path
    return paths


def test_model_file_holds_what_prediction_needs(trained):
    model = HistologyModel.load(trained["cnn-c4avg"])
    assert model.spec.name == "cnn-c4avg" and model.train_inputs.shape == (40, 12, 12, 3)
    assert model.dual_coef.shape == (40, 9) and model.class_names[0] == "ADI"
    assert model.options["n_train"] == 40


def test_predict_tiles_and_json(trained, cli):
    tile = NCT_CRC_SAMPLE / "ADI" / "ADI-AAQEFMRI.tif"
    result = cli("histology", "predict", trained["cnn-c4avg"], tile, NCT_CRC_SAMPLE / "TUM" / "TUM-AACHEHDV.tif",
                 "--json")
    assert result.code == 0, result
    rows = [json.loads(line) for line in result.out.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["tile"].endswith("ADI-AAQEFMRI.tif")
    assert set(rows[0]["scores"]) == set(HistologyModel.load(trained["cnn"]).class_names)
    assert rows[0]["class"] == max(rows[0]["scores"], key=rows[0]["scores"].get)
    assert rows[0]["nngp_std"] >= 0
    table = cli("histology", "predict", trained["cnn"], tile)
    assert table.code == 0 and "ADI-AAQEFMRI.tif" in table.out


def test_averaged_model_is_invariant_on_rotated_tiles(trained, pathmnist):
    """Direct predictions (rotated pixels, no identity used): orbit-same-predictions = 4.0."""
    model = HistologyModel.load(trained["cnn-c4avg"])
    test = pathmnist.images[-30:]
    orbit = [model.predict(np.rot90(test, k, axes=(1, 2)), progress=False) for k in range(4)]
    assert np.mean(orbit_same_predictions(np.stack([p.classes for p in orbit]))) == 4.0
    scores = np.stack([p.scores for p in orbit])
    # Kernel values are invariant to ~1e-7; the ridge solve amplifies that in the scores.
    assert np.max(np.abs(scores - scores[0])) / np.max(np.abs(scores[0])) < 1e-4
    plain = HistologyModel.load(trained["cnn"])
    plain_scores = np.stack([plain.predict(np.rot90(test, k, axes=(1, 2)), progress=False).scores for k in range(2)])
    assert np.max(np.abs(plain_scores[1] - plain_scores[0])) / np.max(np.abs(plain_scores[0])) > 1e-3


def test_report_writes_json_markdown_and_plots(trained, cli, tmp_path):
    out = tmp_path / "report"
    result = cli("histology", "report", trained["cnn-c4avg"], "--n-test", "36", "--out", out)
    assert result.code == 0, result
    report = json.loads((out / "report.json").read_text())
    summary = report["models"][0]
    assert summary["n_test"] == 36 and 0.3 < summary["accuracy"] <= 1.0  # 9 classes: chance is 0.11
    assert summary["orbit_same_predictions"] == 4.0
    assert summary["max_relative_output_change"] < 1e-4
    assert summary["identity_check_max_rel_dev"] < 1e-4
    assert len(summary["confusion_matrix"]) == 9 and sum(map(sum, summary["confusion_matrix"])) == 36
    assert {"report.md", "confusion_cnn-c4avg.png", "rotation_robustness.png"} <= {p.name for p in out.iterdir()}
    assert (out / "rotation_robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert "orbit-same" in (out / "report.md").read_text()
    plain = cli("histology", "report", trained["cnn"], "--n-test", "36", "--out", tmp_path / "plain")
    assert plain.code == 0, plain
    s = json.loads((tmp_path / "plain" / "report.json").read_text())["models"][0]
    assert s["orbit_same_predictions"] < 4.0 and s["max_relative_output_change"] > 1e-3


def test_report_never_scores_training_tiles(trained, tmp_path):
    from eqkernels.pipelines.histology_report import exclude_training_tiles

    model = HistologyModel.load(trained["cnn"])
    left = exclude_training_tiles(model, load_tiles(PATHMNIST_SAMPLE))
    assert len(left) == 718 - 40


# --------------------------------------------------------------------------------- bad input

def assert_one_line_error(result, *needles):
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eqk: error:"), result.err
    assert "Traceback" not in result.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_wrong_kernel_is_refused(trained, cli):
    tile = NCT_CRC_SAMPLE / "ADI" / "ADI-AAQEFMRI.tif"
    assert_one_line_error(cli("histology", "predict", trained["cnn"], tile, "--kernel", "p4cnn"),
                          "cnn.h5", "trained with kernel 'cnn', not 'p4cnn'")


def test_missing_and_corrupt_model_files(trained, cli, tmp_path):
    tile = NCT_CRC_SAMPLE / "ADI" / "ADI-AAQEFMRI.tif"
    assert_one_line_error(cli("histology", "predict", tmp_path / "none.h5", tile), "none.h5", "no such file")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(trained["cnn"].read_bytes()[:3000])
    assert_one_line_error(cli("histology", "predict", broken, tile), "broken.h5")
    out = tmp_path / "rep"
    assert_one_line_error(cli("histology", "report", broken, "--out", out), "broken.h5")
    assert not out.exists()


def test_bad_tiles_through_the_cli(trained, cli, tmp_path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes((NCT_CRC_SAMPLE / "ADI" / "ADI-AAQEFMRI.tif").read_bytes()[:4000])
    assert_one_line_error(cli("histology", "predict", trained["cnn"], corrupt), "corrupt.tif", "truncated TIFF")
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((28, 28), np.uint8))
    assert_one_line_error(cli("histology", "predict", trained["cnn"], gray), "gray.tif", "not an RGB tile")


def test_failed_training_leaves_no_model(cli, tmp_path):
    data = tmp_path / "nct"
    import shutil

    shutil.copytree(NCT_CRC_SAMPLE, data, ignore=shutil.ignore_patterns("*.md"))
    for f in (data / "LYM").iterdir():
        f.unlink()
    out = tmp_path / "model.h5"
    assert_one_line_error(cli("histology", "train", "--data", data, "--out", out, "--n-train", "4"),
                          "LYM", "empty class folder")
    assert not out.exists()
    assert_one_line_error(cli("histology", "train", "--n-train", "5000", "--out", out), "--n-train")
    assert_one_line_error(cli("histology", "train", "--size", "4", "--out", out), "too small")
    assert not out.exists()


def test_usage_errors_and_internal_errors_are_short(cli, monkeypatch):
    """An unknown option is a usage message, exit 2; an unexpected failure is one line, exit 1; no traceback."""
    bad = cli("histology", "train", "--no-such-option")
    assert bad.code == 2 and "No such option" in bad.err and "Traceback" not in bad.err

    import eqkernels.pipelines.histology as histology_pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated failure")

    monkeypatch.setattr(histology_pipeline, "load_tiles", broken)
    monkeypatch.delenv("EQK_DEBUG", raising=False)
    res = cli("histology", "train", "--out", "unused.h5")
    assert res.code == 1
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "ZeroDivisionError: simulated failure" in lines[0] and "Traceback" not in res.err
