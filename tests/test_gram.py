"""The linear program in Gram form (hoyertrim.nettrim.gram): the same misfit, the same solution
as the row form, memory independent of P."""

import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hoyertrim.nettrim import SolverOptions, solve_layer, solve_layer_nm
from hoyertrim.nettrim.gram import GramStats, compress, row_misfit


def _layer(p, n=24, m=8, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(p, n)).astype(np.float32)
    x[:, 2] = 0  # an input that is never on: its weights must stay exactly 0
    w = rng.normal(size=(n, m)) * (rng.random((n, m)) < 0.4)
    y = (x @ w + 0.3 + noise * rng.normal(size=(p, m))).astype(np.float32)
    return x, y


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 60), n=st.integers(1, 6), m=st.integers(1, 4), seed=st.integers(0, 99),
       fit_bias=st.booleans(), with_offset=st.booleans())
def test_compressed_rows_carry_the_same_misfit_for_every_weight(p, n, m, seed, fit_bias,
                                                                with_offset):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(p, n)), rng.normal(size=(p, m))
    offset = rng.normal(size=m) if with_offset else None
    stats = GramStats.zeros(n, m).add(x[: p // 2], y[: p // 2]).add(x[p // 2:], y[p // 2:])
    small = compress(stats, fit_bias=fit_bias, offset=offset)
    kernel, bias = rng.normal(size=(n, m)), rng.normal(size=m) if fit_bias else np.zeros(m)
    real = np.sum((x @ kernel + bias + (0 if offset is None else offset) - y) ** 2)
    design = small.x if small.bias_column is None else np.c_[small.x, small.bias_column]
    u = np.r_[kernel, bias[None]] if fit_bias else kernel
    target = small.y + 0.0
    rows = np.sum((design.astype(np.float64) @ u - target) ** 2) + small.floor
    assert small.x.shape[0] <= n + fit_bias
    assert rows == pytest.approx(real, rel=1e-4, abs=1e-4)  # float32 rows
    assert stats.misfit(kernel, bias, offset).sum() == pytest.approx(real, rel=1e-9, abs=1e-9)
    assert small.y_norm == pytest.approx(np.linalg.norm(y), rel=1e-12)


@pytest.mark.parametrize("mode, polish", [(dict(epsilon=0.1), 0), (dict(kept_fraction=0.25), 0),
                                          (dict(kept_fraction=0.25), 2)])
def test_gram_and_row_forms_reach_the_same_solution(mode, polish):
    x, y = _layer(6000)
    offset = np.linspace(-0.2, 0.2, 8).astype(np.float32)
    options = dict(relu=False, offset=offset, **mode, options=SolverOptions(
        presolve_samples=None, polish=polish))
    rows = solve_layer(x, y, form="rows", **options)
    gram = solve_layer(x, y, form="gram", **options)
    assert gram.discrepancy == pytest.approx(rows.discrepancy, rel=1e-3)
    assert gram.kept_fraction == pytest.approx(rows.kept_fraction, abs=2 / x.size * 8)
    assert np.mean((gram.kernel != 0) == (rows.kernel != 0)) > 0.99
    np.testing.assert_allclose(gram.kernel, rows.kernel, atol=2e-3 * np.abs(rows.kernel).max())
    assert np.all(gram.kernel[2] == 0)
    # the certificate is measured on the real rows
    measured = np.sqrt(row_misfit(x, y, gram.kernel, gram.bias, offset)) / np.linalg.norm(y)
    assert gram.discrepancy == pytest.approx(measured, rel=1e-6)
    assert gram.feasible and gram.discrepancy <= gram.epsilon


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_two_four_and_no_bias_in_gram_form():
    x, y = _layer(4000)
    rows = solve_layer_nm(x, y, nm=(2, 4), relu=False, fit_bias=False, form="rows")
    gram = solve_layer_nm(x, y, nm=(2, 4), relu=False, fit_bias=False, form="gram")
    per_group = (gram.kernel.reshape(-1, 4, 8) != 0).sum(axis=1)
    assert per_group.max() <= 2 and np.all(gram.bias == 0)
    assert gram.discrepancy == pytest.approx(rows.discrepancy, rel=1e-2)


def _chunks(p, chunk=10000, n=8, m=4):
    """P rows of a fixed random layer, made chunk by chunk (never all at once)."""
    w = np.random.default_rng(0).normal(size=(n, m))
    for start in range(0, p, chunk):
        rng = np.random.default_rng(start)
        x = rng.normal(size=(min(chunk, p - start), n)).astype(np.float32)
        yield x, (x @ w + 0.1 * rng.normal(size=(len(x), m))).astype(np.float32)


def _peak_bytes(p):
    tracemalloc.start()
    stats = GramStats.accumulate(_chunks(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solution = solve_layer(gram=stats, epsilon=0.2, relu=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, stats, solution


def test_memory_does_not_grow_with_the_calibration_rows():
    small_peak, _, _ = _peak_bytes(20000)
    peak, stats, solution = _peak_bytes(200000)
    rows_bytes = 200000 * (8 + 4) * 4  # what holding the rows (float32) would take
    assert stats.rows == 200000
    assert peak < rows_bytes / 2 and peak < 1.5 * small_peak + 2 ** 20
    # the certificate from the sums equals the misfit over the rows, recomputed chunk by chunk
    total = sum(row_misfit(x, y, solution.kernel, solution.bias) for x, y in _chunks(200000))
    norm = np.sqrt(sum(float(np.square(y.astype(np.float64)).sum()) for _, y in _chunks(200000)))
    assert solution.discrepancy == pytest.approx(np.sqrt(total) / norm, rel=1e-5)
    assert solution.discrepancy <= 0.2


def test_relu_program_and_bad_chunks_are_refused_clearly():
    stats = GramStats.accumulate(_chunks(100, chunk=50))
    with pytest.raises(ValueError, match="ReLU program needs the layer's rows"):
        solve_layer(gram=stats, epsilon=0.1, relu=True)
    with pytest.raises(ValueError, match="Expected chunks"):
        stats.add(np.zeros((3, 7)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="No calibration rows"):
        GramStats.accumulate([])
    with pytest.raises(ValueError, match="Give the layer's rows"):
        solve_layer(epsilon=0.1)
