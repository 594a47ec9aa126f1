"""Interpolated rotations in the ensembles (fresh rotation per step), the report's rotation sweep and
`eqk compare --group C8`; bad group names through the CLI."""
import json

import numpy as np
import pytest

from eqkernels.ensembles import EnsembleSpec, kernel_learning_rate, train
from eqkernels.groups import rotate, rotation_group
from eqkernels.kernels import ConvNetSpec


def test_augmentation_moves_each_input_by_the_groups_own_action(rng):
    """`augment_inputs` (inside the jitted step) against `RotationGroup.act` on the drawn elements
    (float32 matrix products, measured ~1e-7; bound 1e-5); 256 draws cover all 16 elements of D8."""
    import jax

    from eqkernels.ensembles import augment_inputs

    group = rotation_group("D8")
    x = rng.standard_normal((256, 8, 8, 3)).astype(np.float32)
    moved, g = augment_inputs(jax.random.PRNGKey(3), x, group.matrices(8))
    expected = np.stack([group.act(x[i], int(k)) for i, k in enumerate(np.asarray(g))])
    assert np.max(np.abs(np.asarray(moved) - expected)) < 1e-5 * np.max(np.abs(expected))
    assert set(np.asarray(g).tolist()) == set(range(group.order))


@pytest.mark.slow
def test_fresh_rotation_step_is_a_plain_step_on_a_uniformly_drawn_rotated_tile(pathmnist):
    """One augmented step of each member equals a plain step from the same initialisation on P_g x for
    one g of C8 (reference: plain training on tiles rotated by `rotate`, float32 rounding 1e-5); over
    64 members every element is drawn (deterministic seeds: 64 draws, 8 elements)."""
    from eqkernels.pipelines.histology import Preprocessing

    prep = Preprocessing.fit(pathmnist.images[:50], 8)
    x = rotate(prep(pathmnist.images[:1]), 0.0)
    y = np.array([[1.0, -1.0]])
    common = dict(net=ConvNetSpec(channels=4), n_outputs=2, members=64, steps=1, learning_rate=0.05, seed=7)
    spec = EnsembleSpec(augment="C8", **common)
    assert spec.random_augment and spec.orbit_size == 1 and kernel_learning_rate(spec) == 0.05
    augmented = train(spec, x, y, progress=False)
    group = rotation_group("C8")
    candidates = [train(EnsembleSpec(**common), group.act(x, g), y, progress=False) for g in range(group.order)]
    probe = prep(pathmnist.images[1:5])
    out = augmented.outputs(probe)                                    # (M, 4, 2)
    ref = np.stack([c.outputs(probe) for c in candidates])            # (|G|, M, 4, 2)
    gap = np.max(np.abs(ref - out[None]), axis=(2, 3)) / np.max(np.abs(out))
    drawn = np.argmin(gap, axis=0)
    assert np.all(gap[drawn, np.arange(64)] < 1e-5)
    assert set(drawn.tolist()) == set(range(group.order))


def test_bad_augmentation_group_is_refused():
    with pytest.raises(ValueError, match="unknown group"):
        EnsembleSpec(augment="C8x")
    assert EnsembleSpec(augment="C4").orbit_size == 4  # the exact groups keep full-orbit augmentation


@pytest.fixture(scope="module")
def c8_model(tmp_path_factory):
    from eqkernels.apps.cli import main

    path = tmp_path_factory.mktemp("c8") / "c8.h5"
    assert main(["histology", "train", "--kernel", "cnn-c8avg", "--size", "8", "--n-train", "18",
                 "--out", str(path)]) == 0
    return path


def test_report_sweep_matches_direct_predictions_and_is_exact_on_the_grid(c8_model, pathmnist, cli, tmp_path):
    """Sweep scores at 105° (through the identity on stacked kernels) against a direct prediction of the
    rotated pixels (float32 kernels through the solve: measured ~1e-6, bound 1e-4); quarter turns exact."""
    from eqkernels.pipelines.histology_model import HistologyModel
    from eqkernels.pipelines.histology_report import angle_scores

    model = HistologyModel.load(c8_model)
    assert model.options["invariance_error"]["max"] > 0  # measured and stored with the model
    x = model.preprocessing(pathmnist.images[-4:])
    scores = angle_scores(model, x, [0.0, 90.0, 105.0])
    moved = model.predict_from_relative(model.relative(rotate(x, 105.0), progress=False)).scores
    scale = np.max(np.abs(moved))
    assert np.max(np.abs(scores[2] - moved)) < 1e-4 * scale
    assert np.max(np.abs(scores[1] - scores[0])) < 1e-4 * scale
    out = tmp_path / "rep"
    result = cli("histology", "report", c8_model, "--n-test", "6", "--sweep-tiles", "4", "--n-ood", "2",
                 "--out", out)
    assert result.code == 0, result
    sweep = json.loads((out / "report.json").read_text())["models"][0]["rotation_sweep"]
    assert len(sweep["angles"]) == 24 and sweep["sets"]["test"]["agreement"][6] == 1.0  # 90°
    assert sweep["sets"]["test"]["orbit_same"]["C4"] == 4.0 and set(sweep["sets"]) == {"test", "ood", "noise"}
    assert (out / "rotation_sweep.png").exists() and "C16 OOD noise" in (out / "report.md").read_text()


@pytest.mark.parametrize("group,message", [("C7x", "--group must be one of"), ("E8", "--group must be one of"),
                                           ("C0", "--group must be one of")])
def test_compare_refuses_bad_groups_in_one_line(group, message, cli):
    result = cli("compare", "--group", group, "--budget", "0")
    assert result.code != 0
    lines = [line for line in (result.err + result.out).strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result


def test_compare_refuses_more_rotations_than_the_tile_resolves(cli, monkeypatch):
    from eqkernels.pipelines import histology_compare as hc

    monkeypatch.setitem(hc.GROUP_KERNELS, "C32", ("cnn", "cnn-c16avg", None, "cnn-c4avg"))
    result = cli("compare", "--group", "C32", "--budget", "0")
    assert result.code != 0 and "at most C23 at 8 px" in result.err + result.out, result


@pytest.mark.slow
def test_compare_c8_runs_end_to_end(cli, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "--group", "C8", "--n-train", "12", "--n-test", "10", "--n-ood", "4", "--members", "2",
                 "--seeds", "1", "--steps", "3", "--widths", "8", "--width-members", "1", "--width-n-train", "12",
                 "--curve-sizes", "1,2", "--budget", "0", "--out", out)
    assert result.code == 0, result
    summary = json.loads((out / "report.json").read_text())
    assert summary["group_order"] == 8 and "ensemble cnn-aug" in summary["sweep"]["rows"]
    assert summary["rows"]["kernel cnn-c8avg"]["values"]["orbit_same_test"] > 7.0
    assert (out / "rotation_sweep.png").exists()


def test_train_refuses_a_kernel_the_tile_cannot_resolve(cli, tmp_path):
    out = tmp_path / "m.h5"
    result = cli("histology", "train", "--kernel", "cnn-c16avg", "--size", "5", "--depth", "1", "--n-train", "20",
                 "--out", out)
    assert result.code != 0 and "at most C14 at 5 px" in result.err and not out.exists(), result
    assert len(result.err.strip().splitlines()) == 1


def test_augmentation_needs_the_quarter_turns():
    with pytest.raises(ValueError, match="divisible by 4"):
        EnsembleSpec(augment="C6")
    assert EnsembleSpec(augment="D16").random_augment
