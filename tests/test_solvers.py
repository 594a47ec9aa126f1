"""Mean predictions at time t and posterior variances against neural-tangents.predict."""
import jax
import numpy as np
import pytest
import neural_tangents as nt

from eqkernels.solvers import GaussianPosterior, centred_one_hot, dual_coefficients


def make_problem(rng, n=12, m=5, c=3):
    a = rng.standard_normal((n + m, 6))
    k = a @ a.T / 6 + 0.1
    return k[:n, :n], k[n:, :n], k[n:, n:], rng.standard_normal((n, c))


@pytest.mark.parametrize("t", [0.0, 0.3, 5.0, None])
def test_mean_prediction_matches_neural_tangents(t, rng):
    k_train, k_test, _, y = make_problem(rng)
    ridge = 1e-3
    alpha = dual_coefficients(k_train, y, ridge=ridge, time=t, learning_rate=0.7)
    with jax.experimental.enable_x64():
        predict = nt.predict.gradient_descent_mse(k_train, y, learning_rate=0.7, diag_reg=ridge)
        # neural-tangents' loss is the mean over y.size entries: its time runs y.size times slower.
        t_nt = None if t is None else t * y.size
        _, ref = predict(t_nt, np.zeros_like(y), np.zeros((k_test.shape[0], y.shape[1])), k_test)
    assert np.allclose(k_test @ alpha, ref, rtol=1e-9, atol=1e-12)


def test_long_time_limit_is_kernel_regression(rng):
    k_train, k_test, _, y = make_problem(rng)
    late = dual_coefficients(k_train, y, ridge=1e-4, time=1e9)
    inf = dual_coefficients(k_train, y, ridge=1e-4, time=None)
    assert np.allclose(late, inf, rtol=1e-6, atol=1e-9)
    assert np.allclose(dual_coefficients(k_train, y, time=0.0), 0.0)


def test_posterior_variance_matches_neural_tangents(rng):
    k_train, k_test, k_tt, y = make_problem(rng)
    post = GaussianPosterior.fit(k_train, ridge=1e-3)
    var = post.variance(np.diag(k_tt), k_test)
    with jax.experimental.enable_x64():
        ref = nt.predict.gp_inference(k_train, y, diag_reg=1e-3)(get="nngp", k_test_train=k_test, k_test_test=k_tt)
    assert np.allclose(var, np.diag(ref.covariance), rtol=1e-8, atol=1e-12)
    # A training point has (almost) no posterior variance; a far point keeps its prior variance.
    assert post.variance(np.diag(k_train)[:1], k_train[:1])[0] < 1e-2 * k_train[0, 0]


def test_centred_one_hot_rows_sum_to_zero():
    y = centred_one_hot(np.array([0, 2, 1]), 3)
    assert np.allclose(y.sum(1), 0) and np.argmax(y, 1).tolist() == [0, 2, 1]


@pytest.mark.parametrize("steps", [0, 1, 7, 200])
def test_discrete_gradient_descent_matches_explicit_iteration(steps, rng):
    """k steps f ← f − η Θ (f − y) on the training set, and the test prediction that goes with them."""
    k_train, k_test, _, y = make_problem(rng)
    eta = 1.5 / np.linalg.eigvalsh(k_train)[-1]  # ηλ_max = 1.5: oscillating top mode, still stable
    f_train, f_test = np.zeros_like(y), np.zeros((k_test.shape[0], y.shape[1]))
    for _ in range(steps):
        residual = f_train - y
        f_train, f_test = f_train - eta * k_train @ residual, f_test - eta * k_test @ residual
    alpha = dual_coefficients(k_train, y, ridge=0.0, time=steps, learning_rate=eta, discrete=True)
    assert np.allclose(k_test @ alpha, f_test, rtol=1e-8, atol=1e-10)
    assert np.allclose(k_train @ alpha, f_train, rtol=1e-8, atol=1e-10)
    if steps == 7:  # before convergence, at this step size the continuous-time formula is measurably off
        flow = dual_coefficients(k_train, y, ridge=0.0, time=steps, learning_rate=eta)
        assert np.max(np.abs(k_test @ flow - f_test)) > 1e-3 * np.max(np.abs(f_test))


def test_discrete_time_must_count_whole_steps(rng):
    k_train, _, _, y = make_problem(rng)
    with pytest.raises(ValueError, match="whole number"):
        dual_coefficients(k_train, y, time=2.5, discrete=True)


def test_posterior_survives_duplicate_inputs_in_a_float32_kernel(rng):
    """Duplicated training tiles make K singular; float32 rounding then breaks a 1e-6 ridge Cholesky."""
    x = rng.standard_normal((200, 3))
    x = np.concatenate([x, x])  # every input twice
    k = (x @ x.T + 1.0).astype(np.float32)  # rank 4: the ridge alone keeps it positive definite
    k = k + (rng.standard_normal(k.shape) * 1e-6 * np.abs(k)).astype(np.float32)  # float32-sized asymmetric noise
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(0.5 * (k + k.T).astype(np.float64) + 1e-6 * np.mean(np.diag(k)) * np.eye(len(k)))
    post = GaussianPosterior.fit(k, ridge=1e-6)
    assert 1e-6 < post.ridge <= 1e-2
    assert np.all(np.isfinite(post.cholesky))
    # The variance at a training input stays small next to its prior variance.
    assert post.variance(np.diag(k)[:1].astype(np.float64), k[:1])[0] < 0.05 * k[0, 0]


def test_nan_test_kernels_are_refused(rng):
    """A NaN test kernel used to give NaN predictions and variances without an error (only the
    training kernel was checked)."""
    from eqkernels.errors import InputError
    from eqkernels.solvers import mean_prediction

    k_train, k_test, k_tt, y = make_problem(rng)
    alpha = dual_coefficients(k_train, y, ridge=1e-3)
    assert np.allclose(mean_prediction(k_test, alpha), k_test @ alpha, rtol=1e-12)
    bad = k_test.copy()
    bad[2, 4] = np.nan
    with pytest.raises(InputError, match=r"test kernel has 1 NaN or infinite entries \(first at \(2, 4\)\)"):
        mean_prediction(bad, alpha)
    post = GaussianPosterior.fit(k_train, ridge=1e-3)
    with pytest.raises(InputError, match="test kernel"):
        post.variance(np.diag(k_tt), bad)
    with pytest.raises(InputError, match="test self kernel"):
        post.variance(np.where(np.arange(len(k_tt)) == 1, np.inf, np.diag(k_tt)), k_test)
    with pytest.raises(InputError, match="training kernel"):
        dual_coefficients(np.where(np.eye(len(k_train)) > 0, np.nan, k_train), y)
