import json
import os
import subprocess
import sys

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hoyertrim import masks, nettrim
from hoyertrim.models import MLP


def _layer(seed=0, samples=300, inputs=30, outputs=6, density=0.3, weights=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, inputs)).astype(np.float32)
    w = rng.normal(size=(inputs, outputs)) * (rng.random((inputs, outputs)) < density)
    y = np.maximum(x @ w + 0.1 * rng.normal(size=outputs), 0).astype(np.float32)
    return (x, y, w) if weights else (x, y)


def _cvxpy_optimum(x, y, epsilon):
    """min ‖K‖₁ s.t. ‖(XK+b − Y)_Ω‖² + ‖relu(XK+b)_{Ωᶜ}‖² ≤ ε²‖Y‖², the program solve_layer solves.

    It equals the paper's program with the inactive constraint relaxed to the certificate itself:
    every feasible point still satisfies ‖relu(XK+b) − Y‖_F ≤ ε‖Y‖_F.
    """
    active = (y > 0).astype(float)
    kernel, bias = cp.Variable((x.shape[1], y.shape[1])), cp.Variable(y.shape[1])
    z = x @ kernel + np.ones((x.shape[0], 1)) @ cp.reshape(bias, (1, y.shape[1]), order="C")
    # As a second-order cone (‖·‖₂ ≤ r) rather than a quadratic constraint: the quadratic form
    # made Clarabel stop with "Solution may be inaccurate" at ε = 0.2, and the comparison below
    # is only as good as this optimum.
    # t ≥ relu(z) on the inactive entries (any feasible t can shrink to relu(z)).
    t = cp.Variable(y.shape, nonneg=True)
    residual = cp.hstack([cp.vec(cp.multiply(active, z - y), order="C"),
                          cp.vec(cp.multiply(1 - active, t), order="C")])
    problem = cp.Problem(cp.Minimize(cp.sum(cp.abs(kernel))),
                         [cp.norm(residual, 2) <= epsilon * np.linalg.norm(y), t >= z])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL, problem.status
    return problem.value


@pytest.mark.parametrize("epsilon", [0.05, 0.2])
def test_solve_layer_matches_cvxpy_optimum(epsilon):
    x, y = _layer()
    solution = nettrim.solve_layer(x, y, epsilon=epsilon, options=nettrim.SolverOptions(
        maxiter=2000, tol=1e-6, search_tol=0.005))
    assert solution.feasible and solution.discrepancy <= epsilon
    exact = _cvxpy_optimum(x.astype(np.float64), y.astype(np.float64), epsilon)
    ours = float(np.abs(solution.kernel).sum())
    assert ours <= 1.02 * exact
    assert ours >= 0.98 * exact  # nothing below the optimum: the search really met epsilon


def test_solution_is_certified_and_exactly_sparse():
    x, y = _layer(1, outputs=8)
    solution = nettrim.solve_layer(x, y, epsilon=0.1)
    out = np.maximum(x @ solution.kernel + solution.bias, 0)
    achieved = np.linalg.norm(out - y) / np.linalg.norm(y)
    assert achieved == pytest.approx(solution.discrepancy, rel=1e-4)
    assert achieved <= 0.1
    assert 0 < solution.kept_fraction < 0.6
    assert solution.kept_fraction == pytest.approx(np.mean(solution.kernel != 0))


def test_dead_inputs_get_zero_weights_and_change_nothing():
    x, y = _layer(3)
    padded = np.concatenate([np.zeros((len(x), 2), np.float32), x,
                             np.zeros((len(x), 1), np.float32)], axis=1)
    plain = nettrim.solve_layer(x, y, epsilon=0.1, init_kernel=np.ones((30, 6)))
    solution = nettrim.solve_layer(padded, y, epsilon=0.1, init_kernel=np.ones((33, 6)))
    assert solution.kernel.shape == (33, 6)
    assert not np.any(solution.kernel[[0, 1, 32]])
    np.testing.assert_allclose(solution.kernel[2:32], plain.kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(solution.bias, plain.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_presolve_levels_reach_the_same_solution_with_fewer_full_solves():
    x, y = _layer(4, samples=4000, inputs=40, outputs=8)
    direct = nettrim.solve_layer(x, y, epsilon=0.1,
                                 options=nettrim.SolverOptions(presolve_samples=None))
    presolved = nettrim.solve_layer(x, y, epsilon=0.1,  # 1600 -> 400
                                    options=nettrim.SolverOptions(presolve_samples=1600))
    assert presolved.feasible and presolved.discrepancy <= 0.1
    assert presolved.discrepancy >= 0.97 * 0.1  # the same search band
    assert presolved.presolve_iterations > 0 and presolved.solves < direct.solves
    assert np.abs(presolved.kernel).sum() == pytest.approx(np.abs(direct.kernel).sum(), rel=0.02)


def test_admm_reference_agrees():
    x, y = _layer(2)
    admm = nettrim.solve_layer_admm(x, y, epsilon=0.1, maxiter=5000, tol=1e-5)
    fista = nettrim.solve_layer(x, y, epsilon=0.1, options=nettrim.SolverOptions(
        maxiter=2000, tol=1e-6, search_tol=0.005))
    assert admm.feasible and admm.discrepancy <= 0.1 * 1.001
    assert admm.inactive_violation < 1e-3  # the paper's hard inactive constraint
    # ADMM solves the paper's program (a subset of ours, and it penalizes the bias): our ℓ1 can
    # only be lower, and both prune to a similar support.
    assert np.abs(fista.kernel).sum() <= 1.02 * np.abs(admm.kernel).sum()
    assert abs(fista.kept_fraction - admm.kept_fraction) < 0.15


def test_linear_layer_and_unreachable_epsilon_warns():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 10)).astype(np.float32)
    logits = x @ rng.normal(size=(10, 4)).astype(np.float32)
    solution = nettrim.solve_layer(x, logits, epsilon=0.05, relu=False)
    assert solution.feasible
    assert np.linalg.norm(x @ solution.kernel + solution.bias - logits) <= 0.05 * np.linalg.norm(
        logits) * (1 + 1e-5)
    noise = rng.normal(size=(200, 4)).astype(np.float32)  # not explainable by x at all
    with pytest.warns(UserWarning, match="could not meet epsilon"):
        bad = nettrim.solve_layer(x, noise, epsilon=0.01, relu=False,
                                  options=nettrim.SolverOptions(maxiter=50, max_solves=4))
    assert not bad.feasible


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=np.ones((10, 3)), y=np.ones((9, 2)), epsilon=0.1), "same number of samples"),
    (dict(x=np.full((10, 3), np.nan), y=np.ones((10, 2)), epsilon=0.1), "NaN"),
    (dict(x=np.ones((10, 3)), y=np.ones((10, 2)), epsilon=0.0), "epsilon"),
    (dict(x=np.ones((10, 3)), y=np.ones((10, 2)), epsilon=1.0), "epsilon"),
    (dict(x=np.ones((10, 3)), y=np.zeros((10, 2)), epsilon=0.1), "no active"),
    (dict(x=np.ones((10,)), y=np.ones((10, 2)), epsilon=0.1), "must be"),
    (dict(x=np.ones((10, 3)), y=np.ones((10, 2))), "exactly one"),
    (dict(x=np.ones((10, 3)), y=np.ones((10, 2)), kept_fraction=1.5), "kept_fraction"),
    (dict(x=np.ones((10, 3)), y=np.ones((10, 2)), epsilon=0.1, support=np.ones((2, 2))),
     "support"),
])
def test_bad_inputs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nettrim.solve_layer(**kwargs)


def _small_net():
    model = MLP(hidden=(24, 16), num_classes=5, input_shape=(12,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12)))["params"]
    images = jax.random.normal(jax.random.PRNGKey(1), (400, 12))
    return model, params, images


@pytest.mark.parametrize("scheme", [pytest.param("parallel", marks=pytest.mark.slow),
                                    pytest.param("cascade", marks=pytest.mark.slow)])
def test_network_schemes_certify_and_save(scheme, tmp_path):
    model, params, images = _small_net()
    epsilon = 0.05
    pruned = nettrim.prune_network(model, params, images, epsilon=epsilon, scheme=scheme,
                                   heldout=0, progress=False)
    assert list(pruned.layers) == ["dense0", "dense1", "dense2"]
    for layer in pruned.layers.values():
        assert layer.feasible and layer.discrepancy <= layer.epsilon_certified
        assert layer.measured <= layer.epsilon_certified
    original = model.apply({"params": params}, images)
    new = model.apply({"params": pruned.params}, images)
    relative = float(jnp.linalg.norm(new - original) / jnp.linalg.norm(original))
    if scheme == "cascade":
        # The last layer's certificate is measured against the trained logits directly.
        assert relative == pytest.approx(pruned.layers["dense2"].measured, rel=1e-4)
        assert relative <= pruned.layers["dense2"].epsilon_certified
    kept = [layer.kept_weights / layer.weights for layer in pruned.layers.values()]
    assert min(kept) < 1.0
    for name in pruned.layers:  # masks mark exactly the nonzero kernel entries
        np.testing.assert_array_equal(pruned.masks[name]["kernel"],
                                      pruned.params[name]["kernel"] != 0)
    report = pruned.report(model, (12,))  # the one report type, Net-Trim facts in its details
    assert [layer.name for layer in report.layers] == ["dense0", "dense1", "dense2"]
    assert report.kept_weights == sum(layer.kept_weights for layer in pruned.layers.values())
    assert report.layers[1].details["measured"] == pruned.layers["dense1"].measured
    assert report.details["scheme"] == scheme
    nettrim.save_pruned(tmp_path / "pruned", pruned)
    restored = nettrim.load_pruned(tmp_path / "pruned", params)
    np.testing.assert_array_equal(restored.params["dense0"]["kernel"],
                                  pruned.params["dense0"]["kernel"])
    assert restored.layers["dense1"].kept_weights == pruned.layers["dense1"].kept_weights
    assert restored.scheme == scheme
    import hoyertrim  # and without any template
    loaded = hoyertrim.load(tmp_path / "pruned")
    np.testing.assert_array_equal(loaded.params["dense1"]["kernel"],
                                  pruned.params["dense1"]["kernel"])
    np.testing.assert_array_equal(loaded.masks["dense1"]["kernel"],
                                  pruned.masks["dense1"]["kernel"])


@pytest.mark.slow
def test_load_pruned_of_a_damaged_directory_is_a_clear_error(tmp_path):
    model, params, images = _small_net()
    pruned = nettrim.prune_network(model, params, images, epsilon=0.2, progress=False)
    nettrim.save_pruned(tmp_path / "pruned", pruned)
    for path in (tmp_path / "pruned" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not restore"):
        nettrim.load_pruned(tmp_path / "pruned", params)
    with pytest.raises(FileNotFoundError, match="No pruned network"):
        nettrim.load_pruned(tmp_path / "missing", params)


def test_default_solve_reports_convergence_by_duality_gap():
    x, y = _layer(5, samples=600)
    loose = nettrim.solve_layer(x, y, epsilon=0.1,
                                options=nettrim.SolverOptions(maxiter=2, gap_tol=1e-3))
    tight = nettrim.solve_layer(x, y, epsilon=0.1, options=nettrim.SolverOptions(
        maxiter=3000, tol=1e-7, gap_tol=1e-3))
    assert 0 <= tight.duality_gap < loose.duality_gap
    assert tight.converged and not loose.converged
    assert nettrim.solve_layer(x, y, epsilon=0.1).converged  # the defaults meet gap_tol


def test_support_constraint_keeps_zeros_outside_it():
    x, y, w = _layer(6, weights=True)
    support = (w != 0) | (np.random.default_rng(0).random((30, 6)) < 0.3)
    solution = nettrim.solve_layer(x, y, epsilon=0.1, support=support)
    assert not np.any(solution.kernel[~support])
    assert solution.kept_fraction == pytest.approx(
        np.count_nonzero(solution.kernel) / support.sum())
    assert solution.discrepancy <= 0.1


def test_layer_without_bias_and_with_fixed_offset():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    offset = rng.normal(size=5).astype(np.float32)
    y = np.maximum(x @ rng.normal(size=(12, 5)) + offset, 0).astype(np.float32)
    solution = nettrim.solve_layer(x, y, epsilon=0.1, fit_bias=False, offset=offset)
    assert not np.any(solution.bias)
    achieved = np.linalg.norm(np.maximum(x @ solution.kernel + offset, 0) - y) / np.linalg.norm(y)
    assert achieved == pytest.approx(solution.discrepancy, rel=1e-4)
    assert achieved <= 0.1


def test_kept_fraction_target_is_met_and_certified():
    x, y = _layer(8, samples=500, inputs=40, outputs=10, density=0.6)
    solution = nettrim.solve_layer(x, y, kept_fraction=0.25)
    assert abs(solution.kept_fraction - 0.25) <= nettrim.KEPT_FRACTION_TOLERANCE
    assert solution.discrepancy <= solution.epsilon <= solution.discrepancy * 1.01


@pytest.mark.slow
def test_conv_layers_are_pruned_on_patches():
    from hoyertrim.models import LeNet5
    model = LeNet5()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
    pruned = nettrim.prune_network(model, params, images, epsilon=0.1, layers=["conv0", "conv1"],
                                   max_rows=600, progress=False,
                                   options=nettrim.SolverOptions(maxiter=100))
    assert pruned.params["conv1"]["kernel"].shape == (5, 5, 20, 50)
    assert pruned.layers["conv0"].samples == 600
    assert all(layer.discrepancy <= 0.1 for layer in pruned.layers.values())
    with pytest.raises(ValueError, match="Unknown layers"):
        nettrim.prune_network(model, params, images, epsilon=0.1, layers=["conv7"])


_SHARDED_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import jax, numpy as np
from hoyertrim import masks, nettrim
rng = np.random.default_rng(0)
x = rng.normal(size=(200, 20)).astype(np.float32)
y = np.maximum(x @ (rng.normal(size=(20, 7)) * (rng.random((20, 7)) < 0.3)), 0).astype(np.float32)
s = nettrim.solve_layer(x, y, epsilon=0.1, shard=sys.argv[1] == "1")
print(json.dumps({"devices": jax.device_count(), "kernel": s.kernel.tolist(), "lam": s.lam}))
"""


@pytest.mark.slow
def test_sharded_over_four_devices_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, flag], env=env,
                                      capture_output=True, text=True, check=True).stdout)
            for flag in ("1", "0")]
    assert runs[0]["devices"] == 4
    np.testing.assert_allclose(runs[0]["kernel"], runs[1]["kernel"], atol=1e-5)
    assert runs[0]["lam"] == pytest.approx(runs[1]["lam"])


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_parallel_scheme_obeys_the_error_propagation_bound():
    """Theorem 1 (Net-Trim) without normalization: with e_ℓ the network's error after layer ℓ,
    e_ℓ ≤ ‖Ŵ_ℓ‖₂·e_{ℓ−1} + ε_ℓ‖y_ℓ‖_F (ReLU is 1-Lipschitz; the layer's certificate bounds the
    second term), so e_L ≤ Σ_ℓ ε_ℓ‖y_ℓ‖ Π_{k>ℓ} ‖Ŵ_k‖₂ — the bound itself, no slack."""
    model, params, images = _small_net()
    pruned = nettrim.prune_network(model, params, images, epsilon=0.1, scheme="parallel",
                                   heldout=0, progress=False)
    x = np.asarray(images, np.float64)
    outputs = []
    for name in ("dense0", "dense1", "dense2"):
        z = x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"])
        x = np.maximum(z, 0) if name != "dense2" else z
        outputs.append(x)
    bound = 0.0
    for name, y in zip(("dense0", "dense1", "dense2"), outputs):
        gain = np.linalg.norm(np.asarray(pruned.params[name]["kernel"], np.float64), 2)
        bound = gain * bound + pruned.layers[name].epsilon_certified * np.linalg.norm(y)
    error = np.linalg.norm(np.asarray(model.apply({"params": pruned.params}, images))
                           - outputs[-1])
    assert error <= bound * (1 + 1e-5)
    assert error > 0.05 * bound  # the bound is not vacuous here


_DEVICES_SCRIPT = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import jax, numpy as np
from hoyertrim import masks, nettrim
from hoyertrim.models import MLP
model = MLP(hidden=(24, 16), num_classes=5, input_shape=(12,))
params = model.init(jax.random.PRNGKey(0), np.zeros((1, 12), np.float32))["params"]
images = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (400, 12)))
devices = jax.devices() if sys.argv[1] == "all" else None
pruned = nettrim.prune_network(model, params, images, epsilon=0.05, devices=devices,
                               progress=False)
print(json.dumps({"devices": jax.device_count(),
                  "kernels": {n: np.asarray(p["kernel"]).tolist() for n, p in pruned.params.items()},
                  "measured": {n: r.measured for n, r in pruned.layers.items()}}))
"""


@pytest.mark.slow
def test_parallel_scheme_on_four_devices_equals_one_device():
    four = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu"}
    one = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, flag], env=env,
                                      capture_output=True, text=True, check=True).stdout)
            for flag, env in (("all", four), ("one", one))]
    assert (runs[0]["devices"], runs[1]["devices"]) == (4, 1)
    for name in runs[0]["kernels"]:
        np.testing.assert_array_equal(runs[0]["kernels"][name], runs[1]["kernels"][name])
    assert runs[0]["measured"] == runs[1]["measured"]


def test_devices_only_for_the_parallel_scheme():
    model, params, images = _small_net()
    with pytest.raises(ValueError, match="only the parallel scheme"):
        nettrim.prune_network(model, params, images, epsilon=0.1, scheme="cascade",
                              devices=jax.devices())


@pytest.mark.slow
def test_within_nonzeros_only_makes_a_pruned_network_sparser():
    model, params, images = _small_net()
    pruned_before = masks.apply_masks(params, masks.magnitude_masks(params, 0.6))
    refit = nettrim.prune_network(model, pruned_before, images, epsilon=0.05, scheme="cascade",
                                  within_nonzeros=True, heldout=0, progress=False)
    free = nettrim.prune_network(model, pruned_before, images, epsilon=0.05, scheme="cascade",
                                 heldout=0, progress=False)
    for name in refit.params:
        before = np.asarray(pruned_before[name]["kernel"]) != 0
        after = np.asarray(refit.params[name]["kernel"]) != 0
        assert not np.any(after & ~before)  # no pruned weight comes back
        assert refit.layers[name].measured <= refit.layers[name].epsilon_certified * (1 + 1e-4)
    # Without the constraint the re-fit is free to use weights the magnitude rule removed.
    assert any(np.any((np.asarray(free.params[n]["kernel"]) != 0)
                      & (np.asarray(pruned_before[n]["kernel"]) == 0)) for n in free.params)


@pytest.mark.slow
def test_refit_debiases_the_kept_weights_within_the_certificate():
    model, params, images = _small_net()
    plain = nettrim.prune_network(model, params, images, epsilon=0.1, scheme="cascade",
                                  heldout=0, progress=False)
    refit = nettrim.prune_network(model, params, images, epsilon=0.1, scheme="cascade",
                                  heldout=0, progress=False,
                                  options=nettrim.SolverOptions(refit=True))
    first = "dense0"  # same inputs in both runs: the re-fit's effect alone
    assert refit.layers[first].refit["used"]
    assert refit.layers[first].measured < 0.9 * plain.layers[first].measured
    kept_before = np.asarray(plain.params[first]["kernel"]) != 0
    kept_after = np.asarray(refit.params[first]["kernel"]) != 0
    assert not np.any(kept_after & ~kept_before)  # the support never grows
    for layer in refit.layers.values():
        assert layer.measured <= layer.epsilon_certified * (1 + 1e-4)


def test_polish_keeps_fewer_weights_inside_the_same_certificate():
    x, y = _layer(2, samples=400, inputs=40, outputs=8, density=0.4)
    epsilon = 0.1
    plain = nettrim.solve_layer(x, y, epsilon=epsilon,
                                options=nettrim.SolverOptions(search_tol=0.03))
    polished = nettrim.solve_layer(x, y, epsilon=epsilon,
                                   options=nettrim.SolverOptions(search_tol=0.03, polish=2))
    # The certificate, recomputed here from the returned weights.
    achieved = np.linalg.norm(np.maximum(x @ polished.kernel + polished.bias, 0) - y) / \
        np.linalg.norm(y)
    assert achieved == pytest.approx(polished.discrepancy, rel=1e-4)
    assert achieved <= epsilon and polished.feasible
    kept_plain, kept_polished = plain.kernel != 0, polished.kernel != 0
    assert not np.any(kept_polished & ~kept_plain)  # re-fit on the support, then only removals
    assert kept_polished.sum() < 0.95 * kept_plain.sum()
    assert polished.polish["kept_before"] == pytest.approx(plain.kept_fraction)
    assert sum(polished.polish["removed"]) == kept_plain.sum() - kept_polished.sum()
    assert polished.kept_fraction == pytest.approx(np.mean(kept_polished))


def test_polish_in_kept_fraction_mode_cuts_to_the_count_and_lowers_the_discrepancy():
    x, y = _layer(3, samples=400, inputs=40, outputs=8, density=0.5)
    plain = nettrim.solve_layer(x, y, kept_fraction=0.2)
    polished = nettrim.solve_layer(x, y, kept_fraction=0.2,
                                   options=nettrim.SolverOptions(polish=2))
    assert np.count_nonzero(polished.kernel) == round(0.2 * 40 * 8)  # the count, exactly
    assert polished.kept_fraction == pytest.approx(0.2)
    achieved = np.linalg.norm(np.maximum(x @ polished.kernel + polished.bias, 0) - y) / \
        np.linalg.norm(y)  # the certificate, recomputed from the returned weights
    assert achieved == pytest.approx(polished.discrepancy, rel=1e-4)
    assert polished.epsilon >= achieved and polished.feasible
    # ℓ1's shrinkage removed by the re-fits: well under the plain search at (about) the count.
    assert abs(plain.kept_fraction - 0.2) <= nettrim.search.KEPT_FRACTION_TOLERANCE
    assert polished.discrepancy < 0.8 * plain.discrepancy
    report = polished.polish
    assert report["kept_before"] >= 0.2 and len(report["removed"]) == 2
    assert sum(report["removed"]) == round(report["kept_before"] * 320) - 64


def test_polish_refuses_a_negative_round_count():
    x, y = _layer()
    with pytest.raises(ValueError, match="number of rounds"):
        nettrim.SolverOptions(polish=-1)


