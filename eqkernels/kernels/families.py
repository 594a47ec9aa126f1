"""Kernel families on top of the relative pooled kernels: readouts, group averages, GCNN twins.

For relative pooled kernels M_g = (K_pool, Θ_pool)(x, g·x') (see `relative`):
- plain CNN:         readout(M_e)
- averaged over G:   1/|G| Σ_g readout(M_g)
- GCNN over G:       readout(1/|G| Σ_g M_g)        (Misof, Kessel & Gerken 2025, Thm 4.1)
With the linear readout (an affine map) the last two coincide exactly.
"""
from __future__ import annotations

import numpy as np

from eqkernels.kernels.relative import RelativeKernels
from eqkernels.kernels.spec import ConvNetSpec, KernelSpec


def _relu_moments_np(k, v1, v2):
    """numpy twin of activations.relu_moments in float64, for the small readout arrays."""
    prod = np.sqrt(np.maximum(v1, 0) * np.maximum(v2, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(prod > 0, k / np.where(prod > 0, prod, 1), 0.0)
    rho = np.clip(rho, -1, 1)
    theta = np.arccos(rho)
    k_dot = (np.pi - theta) / (2 * np.pi)
    k_tilde = prod * (np.sqrt(1 - rho ** 2) / (2 * np.pi) + k_dot * rho)
    return k_tilde, k_dot


def readout(net: ConvNetSpec, k_pool, t_pool, self1=None, self2=None):
    """Final (NNGP, NTK) from pooled kernels (N1,N2); `self1` (N1,) / `self2` (N2,) pooled self K."""
    wo, bo = net.readout_weight_std ** 2, net.readout_bias_std ** 2
    if net.readout == "linear":
        nngp = wo * k_pool + bo
        return nngp, nngp + wo * t_pool
    if self1 is None or self2 is None:
        raise ValueError("the mlp readout needs the pooled self kernels")
    wh, bh = net.weight_std ** 2, net.bias_std ** 2
    hidden = wh * k_pool + bh
    hidden_ntk = hidden + wh * t_pool
    k_tilde, k_dot = _relu_moments_np(hidden, (wh * self1 + bh)[:, None], (wh * self2 + bh)[None, :])
    nngp = wo * k_tilde + bo
    return nngp, nngp + wo * k_dot * hidden_ntk


def family_kernels(spec: KernelSpec, rel: RelativeKernels) -> dict[str, np.ndarray]:
    """{'nngp', 'ntk'} arrays (N1, N2) of the named kernel family from relative pooled kernels."""
    net = spec.net
    needs_self = net.readout != "linear"
    if spec.kind == "plain":
        g = 0  # identity is the first element of every group
        s1 = rel.self1_nngp[0] if needs_self else None
        s2 = rel.self2_nngp[0] if needs_self else None
        nngp, ntk = readout(net, rel.nngp[g], rel.ntk[g], s1, s2)
    elif spec.kind == "averaged":
        outs = [readout(net, rel.nngp[g], rel.ntk[g],
                        rel.self1_nngp[0] if needs_self else None,
                        rel.self2_nngp[0] if needs_self else None) for g in range(rel.nngp.shape[0])]
        nngp = np.mean([o[0] for o in outs], axis=0)
        ntk = np.mean([o[1] for o in outs], axis=0)
    elif spec.kind == "gcnn":
        s1 = rel.self1_nngp.mean(0) if needs_self else None
        s2 = rel.self2_nngp.mean(0) if needs_self else None
        nngp, ntk = readout(net, rel.nngp.mean(0), rel.ntk.mean(0), s1, s2)
    else:  # pragma: no cover - KernelSpec validates names
        raise ValueError(spec.kind)
    return {"nngp": nngp, "ntk": ntk}
