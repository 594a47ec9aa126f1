"""Closed-form Gaussian expectations for ReLU (arc-cosine kernels, Cho & Saul 2009).

For (u, u') ~ N(0, [[a, k], [k, b]]) with ρ = k/√(ab) and θ = arccos ρ:
    E[relu(u) relu(u')]   = √(ab) (sin θ + (π − θ) cos θ) / 2π
    E[relu'(u) relu'(u')] = (π − θ) / 2π
These are the same expectations neural-tangents uses for `stax.Relu`; a zero variance gives
ρ = 0 (θ = π/2), as there.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# arccos(x) = √(1−x) · Σ a_i x^i on [0, 1], absolute error below 2e-8:
# Abramowitz & Stegun, Handbook of Mathematical Functions, eq. 4.4.46.
# XLA lowers jnp.arccos / arctan2 to scalar library calls on CPU; this polynomial vectorises,
# which makes the whole kernel several times faster at float32 accuracy.
_ACOS_COEFFS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
                0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def arccos(x):
    """arccos for x in [-1, 1]: a vectorisable polynomial in float32, the exact function in float64."""
    if x.dtype == jnp.float64:
        return jnp.arccos(x)
    a = jnp.abs(x)
    p = jnp.asarray(_ACOS_COEFFS[-1], x.dtype)
    for c in _ACOS_COEFFS[-2::-1]:
        p = p * a + c
    r = jnp.sqrt(jnp.maximum(1 - a, 0)) * p
    return jnp.where(x < 0, np.pi - r, r)


def relu_moments(k, std1, std2):
    """ReLU's (E[φφ'], E[φ̇φ̇']) for covariance `k` and standard deviations `std1`, `std2` (broadcast)."""
    prod = std1 * std2
    # |k| <= prod (Cauchy-Schwarz), so prod == 0 forces k == 0 and ρ = 0 without a branch.
    rho = jnp.clip(k / jnp.maximum(prod, jnp.finfo(k.dtype).tiny), -1, 1)
    theta = arccos(rho)
    k_dot = (np.pi - theta) * (1 / (2 * np.pi))
    k_tilde = prod * (jnp.sqrt(jnp.maximum(1 - rho * rho, 0)) * (1 / (2 * np.pi)) + k_dot * rho)
    return k_tilde, k_dot


def relu_variance(v):
    """E[relu(u)²] for u ~ N(0, v)."""
    return v / 2
