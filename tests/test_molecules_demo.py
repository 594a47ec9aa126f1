"""`run_demo`: trains and evaluates the three kernels on the bundled sample and returns a small table."""
from __future__ import annotations

import json

import pytest

from eqkernels.pipelines.molecules_demo import run_demo


@pytest.mark.slow  # ~1–3 min: compiles three kernels and the quadrature-error references
def test_run_demo_small_budget(tmp_path):
    rows = run_demo(tmp_path, budget_seconds=10)
    assert [r["kernel"] for r in rows] == ["mlp", "mlp-so3avg", "so3gcnn"]
    for r in rows:
        assert set(r) >= {"kernel", "n_train", "mae_meV", "mae_rotated_meV", "invariance_error_rel", "seconds"}
        assert 0 < r["mae_meV"] < 5000 and r["n_train"] >= 10
    by = {r["kernel"]: r for r in rows}
    # the invariant kernels move by (at most) their quadrature error; the plain MLP visibly
    assert by["mlp"]["invariance_error_rel"] > 1e-2
    assert by["mlp-so3avg"]["invariance_error_rel"] < 0.2 and by["so3gcnn"]["invariance_error_rel"] < 0.5
    saved = json.loads((tmp_path / "molecules.json").read_text())
    assert [r["kernel"] for r in saved["rows"]] == [r["kernel"] for r in rows]
    assert [r["mae_meV"] for r in saved["rows"]] == pytest.approx([r["mae_meV"] for r in rows])
