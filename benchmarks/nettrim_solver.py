"""Net-Trim solver benchmark: `solve_layer` (FISTA + λ search) vs the reference ADMM.

    python benchmarks/nettrim_solver.py [--data-dir ../shared/data] [--samples 10000]

Both prune the first layer of a dense LeNet-300-100 (784x300, signals of the first ``--samples``
training images) to the same epsilon. Prints wall time, nonzeros and ℓ1 of each, the time ratio,
the speed-up over the official NumPy ADMM's time on this layer, and the achieved FLOP rate of
`solve_layer`'s FISTA loop (4·P·N·M FLOPs per iteration: two matmuls) as a fraction of this
machine's dense matmul rate on the same shapes.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from hoyertrim import nettrim  # noqa: E402
from hoyertrim.nettrim.problem import NormalizedLayer, layer_data  # noqa: E402
from hoyertrim.nettrim.search import _solve  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.models import create_model  # noqa: E402
from hoyertrim.train import fit  # noqa: E402




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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--admm-maxiter", type=int, default=1000)
    parser.add_argument("--maxiter", type=int, default=300, help="solve_layer's FISTA maxiter")
    args = parser.parse_args()
    dataset = load_dataset("mnist", args.data_dir)
    model = create_model("lenet300100")
    print("training a dense LeNet-300-100 (10 epochs) ...")
    state, _ = fit(model, optax.adam(1e-3), dataset, epochs=10, progress=False)
    captured = nettrim.capture_layers(model, {"params": state.params},
                                      dataset.train.images[: args.samples])
    inputs, outputs, _ = captured["dense0"]
    x = np.asarray(inputs).reshape(args.samples, -1)
    y = np.maximum(np.asarray(outputs), 0)
    print(f"layer 784x300, P={args.samples}, epsilon={args.epsilon}, backend="
          f"{jax.default_backend()}")

    nettrim.solve_layer(x[:500], y[:500], epsilon=args.epsilon, maxiter=5)  # compile
    fista = nettrim.solve_layer(x, y, epsilon=args.epsilon, maxiter=args.maxiter,
                                progress=True)
    admm = nettrim.solve_layer_admm(x, y, epsilon=args.epsilon, maxiter=args.admm_maxiter)
    rows = [("solve_layer (FISTA)", fista), ("ADMM (paper)", admm)]
    print(f"{'solver':<22} {'seconds':>8} {'iters':>6} {'nonzeros':>9} {'kept %':>7} "
          f"{'l1':>9} {'discrepancy':>11}")
    for label, s in rows:
        print(f"{label:<22} {s.seconds:>8.1f} {s.iterations:>6} {np.count_nonzero(s.kernel):>9,} "
              f"{100 * s.kept_fraction:>7.2f} {np.abs(s.kernel).sum():>9.1f} "
              f"{s.discrepancy:>11.4f}")
    print(f"solve_layer: {fista.solves} full-size solves of ≤ {args.maxiter} iterations, "
          f"{fista.presolve_iterations} more iterations on subsamples (2,000 and 500 samples)")
    print(f"time ratio ADMM / solve_layer (this run, same layer and samples): "
          f"{admm.seconds / fista.seconds:.2f}x")

    # The FLOP rate of the solver's inner loop: FISTA iterations on the full problem at the
    # selected λ (two matmuls each, 4·P·N·M FLOPs on the live columns), against the two bare
    # matmuls on the same arrays.
    problem = NormalizedLayer(layer_data(x, y), shard=True, init_kernel=fista.kernel,
                              init_bias=fista.bias)
    _solve(problem, fista.lam, problem.start, args.maxiter, 0.0)  # compile
    started = time.perf_counter()
    _solve(problem, fista.lam, problem.start, args.maxiter, 0.0)
    seconds = time.perf_counter() - started
    rows_, cols = problem.design_n.shape
    achieved = args.maxiter * 4 * rows_ * cols * y.shape[1] / seconds
    peak = matmul_rate(problem.design_n, jnp.zeros((cols, y.shape[1]), jnp.float32))
    print(f"FISTA loop FLOP rate: {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of "
          f"the dense matmul rate on the same shapes ({peak / 1e9:.1f} GFLOP/s; {cols - 1} live "
          f"of {x.shape[1]} inputs)")


if __name__ == "__main__":
    main()
