"""Per-element molecule-kernel amplitudes (issue 16): K(A, B) = Σ_{i∈A, j∈B} c_{Z_i} c_{Z_j} k(x_i, x_j).

Reference: an explicit double loop over atom pairs in numpy, on the per-atom kernel matrix of the library's
`AtomKernel` (the only shared part). float64 (x64): the tiled sum and the loop differ by summation order
only; measured ≤ 1.2e-15 relative, the tolerance is 1e-12. c_H = 0 against the heavy atoms
alone: measured 0 (the zero rows add exact zeros), tolerance 1e-5 (float32 kernels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqkernels.datasets import QM9_SAMPLE
from eqkernels.environments import EnvironmentSpec, atom_amplitudes, atom_environments, channel_scales
from eqkernels.molecule_kernel import MoleculeKernel
from eqkernels.pipelines import molecules as mp
from eqkernels.so3 import AtomKernel, AtomKernelSpec

ENV = EnvironmentSpec(element_amplitudes=(0.3, 1.0, 0.7, 1.5, 1.0))


@pytest.fixture(scope="module")
def mols():
    return mp.load_molecules(QM9_SAMPLE, limit=12).subset(np.arange(7))


def _reference(k_atoms, c1, mol1, n1, c2, mol2, n2):
    """Σ_i Σ_j c_i c_j k_ij over atoms i of molecule A, j of molecule B, one pair at a time."""
    out = np.zeros((n1, n2))
    for i in range(len(mol1)):
        for j in range(len(mol2)):
            out[mol1[i], mol2[j]] += c1[i] * c2[j] * k_atoms[i, j]
    return out


def test_weighted_molecule_kernel_is_the_explicit_double_loop(mols):
    x, mol = atom_environments(ENV, mols.numbers, mols.positions)
    x = (x * channel_scales(ENV, x)[None, :, None]).astype(np.float64)
    c = atom_amplitudes(ENV, mols.numbers)
    z = np.concatenate(mols.numbers)
    assert np.allclose(c[z == 1], 0.3) and np.allclose(c[z == 8], 1.5)
    spec = AtomKernelSpec("mlp-so3avg", quadrature_degree=4)
    a, b = slice(0, int(np.searchsorted(mol, 4))), slice(int(np.searchsorted(mol, 4)), None)
    with jax.experimental.enable_x64():
        atom_kernel = AtomKernel(spec, ENV.l_max, dtype=jnp.float64)
        p = atom_kernel.prepare(jnp.asarray(x))
        nngp, ntk = (np.asarray(k) for k in atom_kernel.pair(p, p))
        mk = MoleculeKernel(spec, ENV.l_max, dtype=jnp.float64, tile=16, progress=False)  # several tiles per side
        sym = mk(x, mol, len(mols), weight1=c)
        cross = mk(x[a], mol[a], 4, x[b], mol[b] - 4, len(mols) - 4, weight1=c[a], weight2=c[b])
        plain = mk(x, mol, len(mols))
    for name, k_atoms in (("nngp", nngp), ("ntk", ntk)):
        ref = _reference(k_atoms, c, mol, len(mols), c, mol, len(mols))
        scale = np.abs(ref).max()
        print(name, np.abs(sym[name] - ref).max() / scale, np.abs(cross[name] - ref[:4, 4:]).max() / scale)
        assert np.abs(sym[name] - ref).max() / scale < 1e-12
        assert np.abs(cross[name] - ref[:4, 4:]).max() / scale < 1e-12
        # the amplitudes change the kernel visibly (not a no-op)
        assert np.abs(plain[name] - ref).max() / scale > 1e-2


def test_model_keeps_its_amplitudes_through_save_and_load(mols, tmp_path):
    from eqkernels.pipelines.molecules_model import fit_model, load_model

    env = EnvironmentSpec().with_amplitude(1, 0.0)
    assert env.element_amplitudes == (0.0, 1.0, 1.0, 1.0, 1.0)
    train, test = mols.subset(np.arange(5)), mols.subset(np.arange(5, 7))
    model = fit_model(train, "U0", "mlp-so3avg", env_spec=env, kernel_spec=AtomKernelSpec("mlp-so3avg", quadrature_degree=4),
                      ridge=1e-3, progress=False)
    loaded = load_model(model.save(tmp_path / "m.h5"))
    assert loaded.env_spec.element_amplitudes == env.element_amplitudes
    assert np.array_equal(loaded.w_train, atom_amplitudes(env, train.numbers))
    assert np.allclose(loaded.predict(test, check=False), model.predict(test, check=False), rtol=0, atol=1e-9)
    # c_H = 0: the kernel is the unweighted kernel of the heavy atoms alone (H atoms dropped from both sides)
    k = model.test_kernel(test)
    x_te, mol_te = model.features(test)
    heavy_te, heavy_tr = np.concatenate(test.numbers) != 1, model.w_train > 0
    k_heavy = model.kernel(False)(x_te[heavy_te], mol_te[heavy_te], len(test), model.x_train[heavy_tr],
                                  model.mol_train[heavy_tr], model.n_train)["ntk"]
    print("c_H = 0 against heavy atoms only:", np.abs(k - k_heavy).max() / np.abs(k_heavy).max())
    assert np.abs(k - k_heavy).max() <= 1e-5 * np.abs(k_heavy).max()  # float32 kernels, summation order


def test_atoms_of_amplitude_zero_are_not_computed(mols):
    """c_H = 0: the kernel visits only heavy-atom pairs (the saving) and still equals the double loop."""
    env = EnvironmentSpec().with_amplitude(1, 0.0)
    x, mol = atom_environments(env, mols.numbers, mols.positions)
    x = (x * channel_scales(env, x)[None, :, None]).astype(np.float64)
    c = atom_amplitudes(env, mols.numbers)
    n_heavy = int(np.sum(c > 0))
    assert 0 < n_heavy < len(c)
    spec = AtomKernelSpec("mlp-so3avg", quadrature_degree=4)
    with jax.experimental.enable_x64():
        atom_kernel = AtomKernel(spec, env.l_max, dtype=jnp.float64)
        p = atom_kernel.prepare(jnp.asarray(x))
        k_atoms = np.asarray(atom_kernel.pair(p, p)[1])
        mk = MoleculeKernel(spec, env.l_max, dtype=jnp.float64, tile=16, progress=False)
        got = mk(x, mol, len(mols), x, mol, len(mols), weight1=c, weight2=c)["ntk"]
    tiles = -(-n_heavy // 16)
    assert mk.last_atom_pairs == (tiles * 16) ** 2     # heavy atoms' tiles only (all atoms: more tiles)
    assert -(-len(c) // 16) > tiles
    ref = _reference(k_atoms, c, mol, len(mols), c, mol, len(mols))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-12


def test_bad_amplitudes_are_refused():
    with pytest.raises(ValueError, match="element_amplitudes"):
        EnvironmentSpec(element_amplitudes=(1.0, 2.0))
    with pytest.raises(ValueError, match="element_amplitudes"):
        EnvironmentSpec(element_amplitudes=(-1.0, 1, 1, 1, 1))


def test_tensor_targets_refuse_amplitudes():
    """The matrix-valued pair sum has no per-atom weights: amplitudes must be refused, not ignored."""
    from eqkernels.datasets import QM9_SAMPLE
    from eqkernels.environments import EnvironmentSpec
    from eqkernels.errors import InputError
    from eqkernels.pipelines.molecules import load_molecules
    from eqkernels.pipelines.molecules_tensor import fit_tensor_model

    train = load_molecules(QM9_SAMPLE).subset(np.arange(4))
    with pytest.raises(InputError, match="amplitudes"):
        fit_tensor_model(train, env_spec=EnvironmentSpec().with_amplitude(1, 0.0), progress=False)


def test_cli_sum_atoms_heavy_stores_c_h_zero_and_refuses_intensive_targets(tmp_path, cli):
    from tests.conftest import one_line_error
    from eqkernels.pipelines.molecules_model import load_model

    out = tmp_path / "heavy.h5"
    r = cli("molecules", "train", "--kernel", "mlp-so3avg", "--quadrature", "4", "--n-train", "10",
            "--sum-atoms", "heavy", "--out", out)
    assert r.code == 0, r
    model = load_model(out)
    assert model.env_spec.element_amplitudes == (0.0, 1.0, 1.0, 1.0, 1.0)
    assert np.sum(model.w_train == 0) > 0 and np.all(model.w_train[model.w_train > 0] == 1.0)
    bad = tmp_path / "homo.h5"
    one_line_error(cli("molecules", "train", "--kernel", "mlp", "--target", "homo", "--n-train", "10",
                       "--sum-atoms", "heavy", "--out", bad), "--sum-atoms heavy", "homo")
    one_line_error(cli("molecules", "train", "--kernel", "mlp", "--n-train", "10", "--sum-atoms", "some",
                       "--out", bad), "--sum-atoms")
    assert not bad.exists()
