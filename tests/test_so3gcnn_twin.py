"""The GCNN theorem on the atom kernels: `so3gcnn` against its averaged MLP twin with a matched head.

`so3gcnn` depth d has d + 1 nonlinearities, so its twin is `mlp-so3avg` depth d + 1; the lifting divides by 4π·C
and the MLP's first Dense by C·(L+1)², so the GCNN gets inputs scaled by √(4π/(L+1)²). Independent paths: the
MLP recursion averages the whole network over the quadrature nodes; the GCNN recursion projects every layer
onto filter degrees ≤ F (Wigner analysis and synthesis), which is the identity only as F → ∞.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from eqkernels.so3 import AtomKernel, AtomKernelSpec

L_MAX = 1
DEGREE = 7  # the default-speed option; the F = 3 filter products at L = 1 are still resolved (measured below)


@pytest.fixture(scope="module")
def atoms():
    return np.random.default_rng(0).standard_normal((6, 3, (L_MAX + 1) ** 2)).astype(np.float32)


def _ntk(atoms, name, depth, band=None):
    spec = AtomKernelSpec(name, depth=depth, quadrature_degree=DEGREE, filter_band_limit=band)
    scale = math.sqrt(4 * math.pi / (L_MAX + 1) ** 2) if name == "so3gcnn" else 1.0
    return AtomKernel(spec, L_MAX)(atoms * scale)["ntk"]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_depth_zero_gcnn_is_its_averaged_mlp_twin(atoms):
    """No group convolution, no band limit: equal up to float32 rounding (measured 1.3e-7; bound 1e-5)."""
    assert _rel(_ntk(atoms, "so3gcnn", 0), _ntk(atoms, "mlp-so3avg", 1)) < 1e-5


def test_band_limit_is_what_separates_the_gcnn_from_its_twin(atoms):
    """Depth 1: the distance to the twin falls as the filter band limit F grows past the signal's L (F > L was a
    shape error before). Measured 1.86e-2 at F = L = 1, 1.04e-3 at F = 3 (4.6e-4 at F = 4, degree 9);
    bounds 1e-2 and 2e-3 (2× margins)."""
    twin = _ntk(atoms, "mlp-so3avg", 2)
    at_signal_band, wider = (_rel(_ntk(atoms, "so3gcnn", 1, band), twin) for band in (1, 3))
    assert at_signal_band > 1e-2 and wider < 2e-3
