"""SO(3) quadrature, atom environments, per-atom kernels and the all-pairs molecule kernel.

Exact identities are checked in float64 (jax's x64 mode inside each test), to 1e-10 relative.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from neural_tangents import stax

from eqkernels.datasets import QM9_SAMPLE
from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
from eqkernels.molecule_kernel import MoleculeKernel, flatten_padded, molecule_kernel_padded
from eqkernels.pipelines import molecules as mp
from eqkernels.so3 import (AtomKernel, AtomKernelSpec, SO3Quadrature, n_fourier, quadrature_error, random_rotations,
                           rotate_coefficients, wigner_d)

x64 = jax.experimental.enable_x64


@pytest.fixture(scope="module")
def small_set():
    mols = mp.load_molecules(QM9_SAMPLE, limit=40)
    return mols.subset(np.arange(12))


def _features(mols, spec=None):
    spec = spec or EnvironmentSpec()
    x, mol = atom_environments(spec, mols.numbers, mols.positions)
    return x.astype(np.float64), mol, spec


def test_quadrature_is_exact_up_to_its_degree_and_not_beyond():
    for degree in (3, 6):
        quad = SO3Quadrature(degree)
        assert quad.weights.sum() == pytest.approx(1.0, abs=1e-14)
        integrals = quad.weights @ quad.wigner_flat(quad.n_alpha)
        start = 0
        for l in range(quad.n_alpha + 1):
            block = integrals[start:start + (2 * l + 1) ** 2]
            start += (2 * l + 1) ** 2
            if l == 0:
                assert block[0] == pytest.approx(1.0, abs=1e-12)
            elif l <= degree:
                assert np.max(np.abs(block)) < 1e-12, (degree, l)
            elif l >= quad.n_alpha:
                assert np.max(np.abs(block)) > 1e-3, (degree, l)  # aliasing starts at the α resolution


def test_wigner_matrices_rotate_spherical_harmonics():
    import e3nn_jax as e3nn

    rots = random_rotations(4, seed=2)
    v = np.random.default_rng(0).normal(size=(7, 3))
    with x64():
        irreps = e3nn.Irreps.spherical_harmonics(3)
        y = np.asarray(e3nn.spherical_harmonics(irreps, jnp.asarray(v), True, "integral").array)
        for r in rots:
            yr = np.asarray(e3nn.spherical_harmonics(irreps, jnp.asarray(v @ r.T), True, "integral").array)
            np.testing.assert_allclose(yr, y @ wigner_d(3, r).T, atol=1e-12)
    assert np.allclose(np.linalg.det(rots), 1.0) and np.allclose(rots @ rots.transpose(0, 2, 1), np.eye(3))


def test_environments_rotate_with_the_molecule_and_ignore_translation_and_order(small_set):
    x, mol, spec = _features(small_set)
    assert x.shape == (len(mol), spec.n_channels, 16)
    r = random_rotations(1, seed=5)[0]
    rng = np.random.default_rng(1)
    perms = [rng.permutation(len(z)) for z in small_set.numbers]
    moved_pos = [p[o] @ r.T + np.array([3.0, -7.0, 1.5]) for p, o in zip(small_set.positions, perms)]
    moved_num = [z[o] for z, o in zip(small_set.numbers, perms)]
    xm, molm = atom_environments(spec, moved_num, moved_pos)
    offsets = np.concatenate([[0], np.cumsum(small_set.n_atoms)])
    expected = np.concatenate([rotate_coefficients(x[offsets[i]:offsets[i + 1]][o], r)
                               for i, o in enumerate(perms)])
    scale = np.abs(x).max()
    assert np.max(np.abs(xm - expected)) / scale < 1e-5   # float32 features
    np.testing.assert_array_equal(molm, mol)


def test_environment_channels_on_methane():
    spec = EnvironmentSpec(radial="power", cutoff=math.inf, powers=(2.0,), centre_channels=True)
    mols = mp.load_molecules(mp.default_data_path().parent / "test_qm9_20mols_allprops.db").subset([0])
    x, _ = atom_environments(spec, mols.numbers, mols.positions)
    # carbon (atom 0) sees 4 H at 1.09 Å: the H channel's l=0 coefficient is 4·Z_C·Z_H/r²·λ_0·Y_00
    r = np.linalg.norm(mols.positions[0][1:] - mols.positions[0][0], axis=1)
    lam0 = spec.angular_coefficients()[0]
    assert x[0, 0, 0] == pytest.approx(np.sum(6.0 / r ** 2) * lam0 / math.sqrt(4 * math.pi), rel=1e-5)
    assert np.all(x[0, 1:5] == 0)                                      # no C, N, O, F neighbours
    assert x[0, 5 + 1, 0] == pytest.approx(spec.centre_weight)         # centre channel of carbon
    # tetrahedral methane: the carbon's H signal has no l = 1 part (dipole cancels)
    assert np.max(np.abs(x[0, 0, 1:4])) < 1e-3 * x[0, 0, 0]


def test_mlp_kernel_equals_neural_tangents():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(5, 3, 16)), rng.normal(size=(4, 3, 16))
    spec = AtomKernelSpec("mlp", depth=2, bias_std=0.3, readout_bias_std=0.2)
    _, _, kernel_fn = stax.serial(stax.Dense(64, math.sqrt(2), 0.3), stax.Relu(), stax.Dense(64, math.sqrt(2), 0.3),
                                  stax.Relu(), stax.Dense(1, 1.0, 0.2))
    with x64():
        ours = AtomKernel(spec, 3, dtype=jnp.float64)(x1, x2)
        ref = kernel_fn(jnp.asarray(x1.reshape(5, -1)), jnp.asarray(x2.reshape(4, -1)), ("nngp", "ntk"))
        np.testing.assert_allclose(ours["ntk"], ref.ntk, rtol=1e-10)
        np.testing.assert_allclose(ours["nngp"], ref.nngp, rtol=1e-10)


def test_averaged_kernel_is_the_quadrature_mean_of_the_mlp_kernel_over_rotations():
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(3, 2, 16)), rng.normal(size=(4, 2, 16))
    spec = AtomKernelSpec("mlp-so3avg", depth=2, quadrature_degree=4)
    _, _, kernel_fn = stax.serial(stax.Dense(64, math.sqrt(2), 0.1), stax.Relu(), stax.Dense(64, math.sqrt(2), 0.1),
                                  stax.Relu(), stax.Dense(1, 1.0, 0.0))
    quad = SO3Quadrature(4)
    d = wigner_d(3, quad.matrices)                                   # (Q, 16, 16), one call
    rotated = np.einsum("qmn,jcn->qjcm", d, x2).reshape(-1, 2 * 16)  # every x2 under every node rotation
    with x64():
        avg = AtomKernel(spec, 3, dtype=jnp.float64)(x1, x2)["ntk"]
        per_rotation = np.asarray(kernel_fn(jnp.asarray(x1.reshape(3, -1)), jnp.asarray(rotated), "ntk"))
    ref = np.einsum("q,iqj->ij", quad.weights, per_rotation.reshape(3, quad.size, 4))
    np.testing.assert_allclose(avg, ref, rtol=1e-10)


def test_gcnn_without_group_convolutions_equals_averaged_one_layer_mlp():
    """Misof, Kessel & Gerken (2025), Thm 4.1: lifting → ReLU → pool → linear is the SO(3)-averaged MLP."""
    rng = np.random.default_rng(2)
    x1, x2 = rng.normal(size=(3, 2, 16)), rng.normal(size=(5, 2, 16))
    rescale = math.sqrt(4 * math.pi / 16)  # the lifting normalises by 4π, the Dense layer by (L+1)²
    with x64():
        gcnn = AtomKernel(AtomKernelSpec("so3gcnn", depth=0, quadrature_degree=6), 3, dtype=jnp.float64)
        avg = AtomKernel(AtomKernelSpec("mlp-so3avg", depth=1, quadrature_degree=6), 3, dtype=jnp.float64)
        a = gcnn(x1 * rescale, x2 * rescale)
        b = avg(x1, x2)
    np.testing.assert_allclose(a["ntk"], b["ntk"], rtol=1e-10)
    np.testing.assert_allclose(a["nngp"], b["nngp"], rtol=1e-10)


def test_band_limit_projection_is_idempotent_on_band_limited_functions():
    from eqkernels.so3 import _band_project, degree_multiplicities

    quad = SO3Quadrature(8)
    wig = quad.wigner_flat(2)
    coeffs = np.random.default_rng(3).normal(size=n_fourier(2))
    f = wig @ coeffs                                   # a function of degree ≤ 2 on the grid
    with x64():
        g = np.asarray(_band_project(jnp.asarray(f), jnp.asarray(wig), jnp.asarray(quad.weights),
                                     jnp.asarray(degree_multiplicities(2))))
    np.testing.assert_allclose(g, f, atol=1e-11)


def test_all_pairs_kernel_equals_neural_tangents_weight_shared_sum_pooled_network():
    rng = np.random.default_rng(4)
    n_mol, n_atoms, d = 3, 4, 2 * 16
    x = rng.normal(size=(n_mol, n_atoms, 2, 16))
    mask = np.ones((n_mol, n_atoms), bool)
    spec = AtomKernelSpec("mlp", depth=2, bias_std=0.2)
    # nt: the per-atom Dense layers act on the last axis and share weights over the atom axis;
    # GlobalSumPool sums the per-atom outputs over atoms.
    _, _, kernel_fn = stax.serial(stax.Dense(64, math.sqrt(2), 0.2), stax.Relu(), stax.Dense(64, math.sqrt(2), 0.2),
                                  stax.Relu(), stax.Dense(1, 1.0, 0.0), stax.GlobalSumPool())
    with x64():
        ref = kernel_fn(jnp.asarray(x.reshape(n_mol, n_atoms, d)), None, ("nngp", "ntk"))
        ours = molecule_kernel_padded(spec, 3, x, mask, tile=5, dtype=jnp.float64, progress=False)
    # 1e-8, not 1e-10: each atom also meets itself (ρ = 1), where nt's arc-cosine is evaluated with a
    # safety clip; off-diagonal atom pairs agree to 1e-10 (test_mlp_kernel_equals_neural_tangents).
    np.testing.assert_allclose(ours["ntk"], ref.ntk, rtol=1e-8)
    np.testing.assert_allclose(ours["nngp"], ref.nngp, rtol=1e-8)


def test_padding_masks_and_tiles_do_not_change_the_molecule_kernel():
    rng = np.random.default_rng(5)
    counts = [3, 1, 5, 2, 4]
    x = np.zeros((5, 6, 2, 16))
    mask = np.zeros((5, 6), bool)
    for i, c in enumerate(counts):
        x[i, :c] = rng.normal(size=(c, 2, 16))
        x[i, c:] = rng.normal(size=(6 - c, 2, 16)) * 100   # junk in padded slots must be ignored
        mask[i, :c] = True
    spec = AtomKernelSpec("so3gcnn", quadrature_degree=4)
    with x64():
        k_atoms = AtomKernel(spec, 3, dtype=jnp.float64)
        flat, mol, _ = flatten_padded(x, mask)
        atom = k_atoms(flat)["ntk"]
        onehot = np.eye(5)[mol]
        expected = onehot.T @ atom @ onehot
        for tile in (2, 3, 7, 64):
            sym = molecule_kernel_padded(spec, 3, x, mask, tile=tile, dtype=jnp.float64, progress=False)["ntk"]
            full = molecule_kernel_padded(spec, 3, x, mask, x, mask, tile=tile, dtype=jnp.float64,
                                          progress=False)["ntk"]
            np.testing.assert_allclose(sym, expected, rtol=1e-10)
            np.testing.assert_allclose(full, expected, rtol=1e-10)


def _predictions(kernel, x_tr, mol_tr, n_tr, alpha, x_te, mol_te, n_te):
    return kernel(x_te, mol_te, n_te, x_tr, mol_tr, n_tr)["ntk"] @ alpha


@pytest.mark.parametrize("name", ["mlp", "mlp-so3avg", "so3gcnn"])
def test_symmetry_of_predictions(small_set, name):
    """Rotations, translations and atom permutations of test molecules: invariant kernels do not move."""
    spec_env = EnvironmentSpec()
    train, test = small_set.subset(np.arange(8)), small_set.subset(np.arange(8, 12))
    x_tr, mol_tr = atom_environments(spec_env, train.numbers, train.positions)
    scale = channel_scales(spec_env, x_tr)
    x_tr = x_tr * scale[None, :, None]
    alpha = np.random.default_rng(0).normal(size=len(train))
    spec = AtomKernelSpec(name, quadrature_degree=7)
    with x64():
        kernel = MoleculeKernel(spec, 3, dtype=jnp.float64, progress=False)

        def predict(mols):
            x, mol = atom_environments(spec_env, mols.numbers, mols.positions)
            return _predictions(kernel, x_tr, mol_tr, len(train), alpha, x * scale[None, :, None], mol, len(mols))

        base = predict(test)
        size = np.max(np.abs(base))
        shifted = predict(mp.transformed_copies(test, 3, rotate=False, translate=True, permute=True))
        rotated = predict(mp.transformed_copies(test, 4, rotate=True, translate=False, permute=False))
    # translations and permutations: exact up to float32 features
    assert np.max(np.abs(shifted - base)) / size < 1e-6
    change = np.max(np.abs(rotated - base)) / size
    if name == "mlp":
        assert change > 1e-2  # the plain MLP is visibly not invariant
    else:
        offsets = np.concatenate([[0], np.cumsum(test.n_atoms)])
        x_te, _ = atom_environments(spec_env, test.numbers, test.positions)
        sample_te = x_te[:offsets[2]] * scale[None, :, None]
        stated = quadrature_error(spec, sample_te, x_tr[:40])
        # the exact kernel is invariant; the quadrature moves both terms by at most its error
        assert change < max(1e-6, 4 * stated), (change, stated)
        assert stated < 5e-3


def test_rotation_error_shrinks_with_quadrature_degree_and_reaches_1e6_with_a_smooth_activation(small_set):
    """The exact averaged/GCNN kernels are invariant; what remains is quadrature error, which shrinks.

    With ReLU it shrinks slowly: the NTK's K̇ has a square-root cusp at the rotation that maps one
    atom environment onto an equivalent one (e.g. two H of a CH₃). With erf the integrand is analytic.
    """
    spec_env = EnvironmentSpec()
    x, mol = atom_environments(spec_env, small_set.numbers[:3], small_set.positions[:3])
    x = x * channel_scales(spec_env, x)[None, :, None]
    r = random_rotations(1, seed=9)[0]
    a_atoms, b_atoms = x[:6], x[6:14]
    b_rot = rotate_coefficients(b_atoms, r)

    def change(spec):
        with x64():
            k = AtomKernel(spec, 3, dtype=jnp.float64)
            a, b = k(a_atoms, b_atoms)["ntk"], k(a_atoms, b_rot)["ntk"]
        return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))

    for name in ("mlp-so3avg", "so3gcnn"):
        errors = [change(AtomKernelSpec(name, quadrature_degree=d)) for d in (3, 7, 13)]
        assert errors[0] > errors[1] > errors[2], (name, errors)
        assert errors[2] < 1e-3, (name, errors)
    assert change(AtomKernelSpec("mlp-so3avg", activation="erf", quadrature_degree=17)) < 1e-6  # measured 2.2e-7
    assert change(AtomKernelSpec("mlp", activation="erf")) > 1e-2


def test_erf_kernel_equals_neural_tangents():
    rng = np.random.default_rng(6)
    x1, x2 = rng.normal(size=(4, 3, 16)), rng.normal(size=(3, 3, 16))
    spec = AtomKernelSpec("mlp", activation="erf", depth=2, bias_std=0.3)
    _, _, kernel_fn = stax.serial(stax.Dense(64, math.sqrt(2), 0.3), stax.Erf(), stax.Dense(64, math.sqrt(2), 0.3),
                                  stax.Erf(), stax.Dense(1, 1.0, 0.0))
    with x64():
        ours = AtomKernel(spec, 3, dtype=jnp.float64)(x1, x2)
        ref = kernel_fn(jnp.asarray(x1.reshape(4, -1)), jnp.asarray(x2.reshape(3, -1)), ("nngp", "ntk"))
    np.testing.assert_allclose(ours["ntk"], ref.ntk, rtol=1e-9)
    np.testing.assert_allclose(ours["nngp"], ref.nngp, rtol=1e-9)


def test_quadrature_kernels_are_exactly_symmetric():
    rng = np.random.default_rng(7)
    x1, x2 = rng.normal(size=(3, 2, 16)), rng.normal(size=(4, 2, 16))
    for degree in (4, 5):  # the grid is closed under inversion for every degree
        for name in ("mlp-so3avg", "so3gcnn"):
            with x64():
                k = AtomKernel(AtomKernelSpec(name, quadrature_degree=degree), 3, dtype=jnp.float64)
                np.testing.assert_allclose(k(x1, x2)["ntk"], k(x2, x1)["ntk"].T, rtol=1e-12)
