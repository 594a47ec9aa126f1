"""Symmetry and distance measures on hand-made outputs."""
import numpy as np
import pytest

from eqkernels import metrics


def test_mean_relative_change_is_zero_for_invariant_outputs_and_scales_with_the_change(rng):
    base = rng.standard_normal((5, 3))
    invariant = np.stack([base] * 4)
    assert metrics.mean_relative_change(invariant) == 0.0
    changed = invariant.copy()
    changed[1:] += 0.1 * rng.standard_normal((3, 5, 3))
    small = metrics.mean_relative_change(changed)
    changed[1:] = invariant[1:] + 10 * (changed[1:] - invariant[1:])
    assert 0 < small < 0.2 and metrics.mean_relative_change(changed) == pytest.approx(10 * small)
    # One scale for all inputs: an input with a zero output does not blow the measure up.
    with_zero = changed.copy()
    with_zero[:, 0] = 0.0
    with_zero[1, 0] = 1e-3
    assert np.isfinite(metrics.mean_relative_change(with_zero))


def test_relative_distance():
    a = np.array([[3.0, 4.0]])
    assert metrics.relative_distance(a, a) == 0.0
    assert metrics.relative_distance(np.zeros_like(a), a) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        metrics.relative_distance(a, a.T)


def test_mean_relative_change_with_a_fixed_scale(rng):
    outputs = rng.standard_normal((4, 6, 3))
    absolute = np.mean(np.linalg.norm(outputs[1:] - outputs[:1], axis=-1))
    assert metrics.mean_relative_change(outputs, scale=2.0) == pytest.approx(absolute / 2)
    # Halving the outputs halves the fixed-scale measure; the self-normalised one does not move.
    assert metrics.mean_relative_change(outputs / 2, scale=2.0) == pytest.approx(absolute / 4)
    assert metrics.mean_relative_change(outputs / 2) == pytest.approx(metrics.mean_relative_change(outputs))
