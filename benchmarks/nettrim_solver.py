"""Net-Trim solver benchmark: `solve_layer` vs the paper's ADMM on the same layer, in one run.

    python benchmarks/nettrim_solver.py [--data-dir ../shared/data] [--samples 10000]
                                        [--epsilons 0.05 0.3] [--json results/...json]

The layer: the first layer (784x300) of a LeNet-300-100 trained here, deterministically (seed 0,
Adam 1e-3, batch 128, 10 epochs), on the signals of the first ``--samples`` training images.
For each ε the same samples go to `solve_layer` (default settings), `solve_layer(polish=1)` and
`solve_layer_admm` run to convergence (primal residual ≤ 1e-4 relative, at most
``--admm-maxiter`` iterations; whether it converged is printed). Printed per solver: wall time,
iterations, nonzeros, ℓ1, the measured discrepancy, and the ADMM / solver time ratio — every
ratio from this run. Finally the FLOP rate of `solve_layer`'s FISTA loop as a fraction of this
machine's dense matmul rate on the same shapes (same run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from hoyertrim import nettrim  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.inspection import record_maps  # noqa: E402
from hoyertrim.models import create_model  # noqa: E402
from hoyertrim.nettrim.problem import NormalizedLayer, layer_data  # noqa: E402
from hoyertrim.nettrim.search import solve_at_lambda  # noqa: E402
from hoyertrim.train import fit  # noqa: E402

RECIPE = dict(model="lenet300100", seed=0, optimizer="adam", learning_rate=1e-3, batch_size=128,
              epochs=10)


def matmul_rate(x, u):
    """FLOP/s of z = x @ u followed by x.T @ z, the two products of one FISTA iteration."""
    step = jax.jit(lambda x, u: x.T @ (x @ u))
    jax.block_until_ready(step(x, u))
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        out = step(x, u)
    jax.block_until_ready(out)
    return repeats * 4 * x.shape[0] * x.shape[1] * u.shape[1] / (time.perf_counter() - started)


def row(label, solution):
    return {"solver": label, "seconds": solution.seconds, "iterations": solution.iterations,
            "nonzeros": int(np.count_nonzero(solution.kernel)),
            "kept_fraction": solution.kept_fraction,
            "l1": float(np.abs(solution.kernel).sum()), "discrepancy": solution.discrepancy,
            "converged": solution.converged}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.3])
    parser.add_argument("--admm-maxiter", type=int, default=20000)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    dataset = load_dataset("mnist", args.data_dir)
    model = create_model(RECIPE["model"])
    print(f"training the benchmark's network: {RECIPE} ...", flush=True)
    state, _ = fit(model, optax.adam(RECIPE["learning_rate"]), dataset, epochs=RECIPE["epochs"],
                   batch_size=RECIPE["batch_size"], seed=RECIPE["seed"], progress=False)
    captured = record_maps(model, {"params": state.params},
                                      dataset.train.images[: args.samples])
    inputs, outputs, _ = captured["dense0"]
    x = np.asarray(inputs).reshape(args.samples, -1)
    y = np.maximum(np.asarray(outputs), 0)
    print(f"layer dense0 784x300, P={args.samples}, backend={jax.default_backend()}, "
          f"{jax.devices()[0].device_kind}, {platform.node()}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}", flush=True)
    with warnings.catch_warnings():  # 5 iterations cannot meet ε; this only compiles
        warnings.simplefilter("ignore")
        nettrim.solve_layer(x[:500], y[:500], epsilon=0.1,
                            options=nettrim.SolverOptions(maxiter=5))

    results = {"recipe": RECIPE, "samples": args.samples, "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
               "admm": {"tol": 1e-4, "maxiter": args.admm_maxiter, "rho": 100.0}, "runs": []}
    header = (f"{'ε':>5} {'solver':<24} {'seconds':>8} {'iters':>6} {'nonzeros':>9} "
              f"{'kept %':>7} {'l1':>8} {'discrepancy':>11} {'ADMM time / this':>17}")
    for epsilon in args.epsilons:
        plain = nettrim.solve_layer(x, y, epsilon=epsilon, progress=True)
        polished = nettrim.solve_layer(x, y, epsilon=epsilon, progress=True,
                                       options=nettrim.SolverOptions(polish=1))
        admm = nettrim.solve_layer_admm(x, y, epsilon=epsilon, maxiter=args.admm_maxiter)
        rows = [row("solve_layer", plain), row("solve_layer(polish=1)", polished),
                row("ADMM (paper, converged)" if admm.converged else "ADMM (NOT converged)",
                    admm)]
        print(header)
        for r in rows:
            r["admm_time_ratio"] = admm.seconds / r["seconds"]
            print(f"{epsilon:>5} {r['solver']:<24} {r['seconds']:>8.1f} {r['iterations']:>6} "
                  f"{r['nonzeros']:>9,} {100 * r['kept_fraction']:>7.2f} {r['l1']:>8.1f} "
                  f"{r['discrepancy']:>11.4f} {r['admm_time_ratio']:>16.2f}x", flush=True)
        results["runs"].append({"epsilon": epsilon, "rows": rows})

    # The FLOP rate of the solver's inner loop: FISTA iterations on the full problem at the last
    # selected λ (two matmuls each, 4·P·N·M FLOPs on the live columns), against the two bare
    # matmuls on the same arrays.
    maxiter = 300
    problem = NormalizedLayer(layer_data(x, y), shard=True, init_kernel=plain.kernel,
                              init_bias=plain.bias)
    solve_at_lambda(problem, plain.lam, problem.start, maxiter, 0.0)  # compile
    started = time.perf_counter()
    solve_at_lambda(problem, plain.lam, problem.start, maxiter, 0.0)
    seconds = time.perf_counter() - started
    rows_, cols = problem.design_n.shape
    achieved = maxiter * 4 * rows_ * cols * y.shape[1] / seconds
    peak = matmul_rate(problem.design_n, jnp.zeros((cols, y.shape[1]), jnp.float32))
    results["fista_matmul_fraction"] = achieved / peak
    print(f"FISTA loop FLOP rate: {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of "
          f"the dense matmul rate on the same shapes ({peak / 1e9:.1f} GFLOP/s; {cols - 1} live "
          f"of {x.shape[1]} inputs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
