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
from eqkernels.so3 import (AtomKernel, AtomKernelSpec, SO3Quadrature, n_fourier, quadrature_errors, random_rotations,
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


def _point_signals(points, weights):
    """Sphere signals Σ_p w_p δ(· − p̂) band-limited to l ≤ 3: (…, C, 16) from points (…, C, P, 3), weights (…, C, P).

    Rotating the points rotates the signal, computed from e3nn's spherical harmonics directly (no Wigner
    matrices), so it is an independent way to rotate inputs.
    """
    import e3nn_jax as e3nn

    y = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(3), jnp.asarray(points), True, "integral").array
    return np.einsum("...cp,...cpm->...cm", weights, np.asarray(y))


def test_averaged_kernel_equals_a_monte_carlo_average_over_haar_rotations():
    """mlp-so3avg (degree 7) against neural-tangents' MLP NTK averaged over 2,000 Haar-random rotations
    (scipy's Rotation), the inputs rotated as point sets.

    Control variate: the first layer's covariance k¹(R) = σ_w²/d ⟨x1, R·x2⟩ + σ_b², whose Haar mean is the
    closed form σ_w²/d Σ_c x1[c,0] x2[c,0] + σ_b² (only degree 0 survives averaging); it cuts the standard
    error 8× (0.45 % → 0.054 % of the largest entry, measured). Measured |ours − MC| ≤ 1.6 standard errors at
    degrees 7 and 13, 3.8 at degree 4 and 14 at degree 2: the bound of 4 standard errors per entry is what a
    wrong weight, node set or rotation convention breaks.
    """
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(1)
    p1, p2 = rng.normal(size=(3, 2, 4, 3)), rng.normal(size=(4, 2, 4, 3))
    w1, w2 = rng.uniform(0.5, 1.5, size=(3, 2, 4)), rng.uniform(0.5, 1.5, size=(4, 2, 4))
    spec = AtomKernelSpec("mlp-so3avg", depth=2, quadrature_degree=7)
    _, _, kernel_fn = stax.serial(stax.Dense(64, math.sqrt(2), 0.1), stax.Relu(), stax.Dense(64, math.sqrt(2), 0.1),
                                  stax.Relu(), stax.Dense(1, 1.0, 0.0))
    n_rot, d = 2000, 2 * 16
    rotations = Rotation.random(n_rot, random_state=7).as_matrix()
    with x64():
        x1, x2 = _point_signals(p1, w1), _point_signals(p2, w2)
        x2_rot = _point_signals(np.einsum("rab,ncpb->rncpa", rotations, p2), w2)          # (R, 4, 2, 16)
        per = np.asarray(kernel_fn(jnp.asarray(x1.reshape(3, -1)), jnp.asarray(x2_rot.reshape(n_rot * 4, -1)),
                                   "ntk")).reshape(3, n_rot, 4)
        ours = AtomKernel(spec, 3, dtype=jnp.float64)(x1, x2)["ntk"]
    k1 = 2.0 / d * np.einsum("if,rjf->irj", x1.reshape(3, -1), x2_rot.reshape(n_rot, 4, -1)) + 0.01
    k1_mean = 2.0 / d * np.einsum("ic,jc->ij", x1[:, :, 0], x2[:, :, 0]) + 0.01
    centred = k1 - k1.mean(1, keepdims=True)
    beta = np.einsum("irj,irj->ij", per - per.mean(1, keepdims=True), centred) / np.einsum("irj,irj->ij", centred, centred)
    adjusted = per - beta[:, None] * (k1 - k1_mean[:, None])
    mc, se = adjusted.mean(1), adjusted.std(1, ddof=1) / math.sqrt(n_rot)
    assert np.all(np.abs(ours - mc) < 4 * se), np.max(np.abs(ours - mc) / se)
    assert np.max(se) / np.max(np.abs(mc)) < 2e-3  # the reference is sharp enough to mean something


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


# Bounds on |prediction at degree 7 − degree-15 reference| / max |prediction| for this set: measured against a
# degree-31 quadrature 1.3e-6 (mlp-so3avg) and 6.0e-4 (so3gcnn) for original and rotated molecules alike, with
# the degree-15 reference itself 8e-8 / 4.4e-6 from it; the bounds leave a margin of ~3×.
DEGREE_7_BOUND = {"mlp-so3avg": 4e-6, "so3gcnn": 2e-3}


@pytest.mark.parametrize("name", ["mlp", "mlp-so3avg", "so3gcnn"])
def test_symmetry_of_predictions(small_set, name):
    """Rotations, translations and atom permutations of test molecules: invariant kernels do not move.

    Invariance is checked against an independent reference: the exact kernel is invariant, so rotated
    molecules must give the unrotated molecules' predictions of a much finer quadrature (degree 15),
    within the degree-7 quadrature error measured against degree 31 (`DEGREE_7_BOUND`).
    """
    spec_env = EnvironmentSpec()
    train, test = small_set.subset(np.arange(8)), small_set.subset(np.arange(8, 12))
    x_tr, mol_tr = atom_environments(spec_env, train.numbers, train.positions)
    scale = channel_scales(spec_env, x_tr)
    x_tr = x_tr * scale[None, :, None]
    alpha = np.random.default_rng(0).normal(size=len(train))

    def predictor(degree):
        kernel = MoleculeKernel(AtomKernelSpec(name, quadrature_degree=degree), 3, dtype=jnp.float64, progress=False)

        def predict(mols):
            x, mol = atom_environments(spec_env, mols.numbers, mols.positions)
            return _predictions(kernel, x_tr, mol_tr, len(train), alpha, x * scale[None, :, None], mol, len(mols))
        return predict

    with x64():
        predict = predictor(7)
        base = predict(test)
        size = np.max(np.abs(base))
        shifted = predict(mp.transformed_copies(test, 3, rotate=False, translate=True, permute=True))
        rotated = predict(mp.transformed_copies(test, 4, rotate=True, translate=False, permute=False))
        reference = predictor(15)(test) if name != "mlp" else None
    # translations and permutations: exact up to float32 features
    assert np.max(np.abs(shifted - base)) / size < 1e-6
    if name == "mlp":
        assert np.max(np.abs(rotated - base)) / size > 1e-2  # the plain MLP is visibly not invariant
        return
    for predictions in (base, rotated):
        error = np.max(np.abs(predictions - reference)) / size
        assert error < DEGREE_7_BOUND[name], (name, error)


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


def test_stated_quadrature_error_covers_self_pairs_and_rotated_copies(small_set):
    """The stated per-atom error must cover the errors that rotated atoms actually meet.

    Actual error: |Θ_7(x_i, D(R) x_i) − Θ_39(x_i, x_i)| / max_i Θ_39(x_i, x_i), each atom of two whole
    molecules against its own rotated copy, for a rotation the statement did not use (seed 11), against a
    degree-39 quadrature (its own error is ~1/30 of degree 15's, `so3.reference_degree_for`). Measured:
    stated 2.9e-3 (self pairs 2.4e-3, rotated copies 2.9e-3), actual 6.1e-4; the old measure (pairs of
    different atoms, degree 7 vs 15) gave 1.5e-5 for `mlp-so3avg` on QM9 atoms (issue 11). Margin:
    actual ≤ 2 × stated, and the statement must not be the small different-atom figure (> 1e-4).
    """
    from dataclasses import replace

    from eqkernels.so3 import _cached_atom_kernel, _self_pair_ntk

    x, mol, _ = _features(small_set.subset(np.arange(2)))
    x = x * channel_scales(EnvironmentSpec(), x)[None, :, None]
    spec = AtomKernelSpec("mlp-so3avg", quadrature_degree=7)
    stated = quadrature_errors(spec, x)
    with x64():
        ours = _cached_atom_kernel(spec, 3, jnp.float64)
        ref = _self_pair_ntk(_cached_atom_kernel(replace(spec, quadrature_degree=39), 3, jnp.float64), x)
        moved = np.diagonal(ours(x, rotate_coefficients(x, random_rotations(1, seed=11)[0]))["ntk"])
    actual = np.max(np.abs(moved - ref)) / np.max(ref)
    assert stated["reference_degree"] == 39 and stated["max"] == max(stated["self_pair"], stated["rotation"])
    assert actual <= 2 * stated["max"], (actual, stated)
    assert stated["max"] > 1e-4
