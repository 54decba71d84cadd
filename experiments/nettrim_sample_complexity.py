"""Net-Trim's sample complexity (Theorem 3): phase transitions of exact recovery of planted
sparse ReLU neurons, against basis pursuit on the same data.

    python experiments/nettrim_sample_complexity.py

For Gaussian inputs x ∈ R^N and a neuron w* with s nonzero N(0, 1) weights, P samples give
y = relu(X w*); Net-Trim's exact program (minimize ‖w‖₁ with X_Ω w = y_Ω on the active samples,
X_Ωᶜ w ≤ 0 on the others; `nettrim.exact`) succeeds when ‖ŵ − w*‖ / ‖w*‖ < 1e-3. Theorem 3 says
P = O(s log(N/s)) samples suffice. Basis pursuit (every sample an equality, y = X w*) is the
linear reference: how much does seeing only relu(·) cost?

Every (N, s, P) cell runs ``--trials`` independent problems, vmapped under jit; P* is where the
success rate crosses 50% (linear interpolation in P), and P* / (s·log(N/s)) is the constant the
theorem predicts to be roughly the same for every (N, s). Writes
results/nettrim_sample_complexity.json and .png.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import time

# Pinned to one core before jax starts: on jax 0.10.2 this vmapped float64 program hangs for
# some shapes (e.g. N = 40, P = 32) when XLA's CPU runtime runs it on two threads; on one it
# finishes in seconds.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import common  # noqa: F401  (silences jaxopt's deprecation warning)
import jax
import jax.numpy as jnp
import numpy as np

from hoyertrim.nettrim import exact

SUCCESS = 1e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[50, 100], help="input dimensions N")
    parser.add_argument("--sparsity", type=float, nargs="+",
                        default=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3], help="s / N values")
    parser.add_argument("--ratios", type=float, nargs="+",
                        default=[round(0.05 * i, 2) for i in range(1, 31)],
                        help="P / N values")
    parser.add_argument("--trials", type=int, default=30, help="problems per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results/nettrim_sample_complexity.json")
    return parser.parse_args(argv)


@functools.lru_cache(maxsize=None)
def make_cell(n: int, p: int):
    """jitted ``(keys, s) -> (relu errors, linear errors, worst optimality measure)`` of the
    cells with N = n and P = p (s is traced: one compilation per shape)."""

    def trial(key, s):
        k_support, k_weights, k_x = jax.random.split(key, 3)
        support = jax.random.permutation(k_support, n) < s
        planted = jnp.where(support, jax.random.normal(k_weights, (n,)), 0.0)
        x = jax.random.normal(k_x, (p, n))
        z = x @ planted
        relu_w, relu_gap = exact.nettrim_neuron(x, jax.nn.relu(z))
        linear_w, linear_gap = exact.basis_pursuit(x, z)
        norm = jnp.linalg.norm(planted)
        return (jnp.linalg.norm(relu_w - planted) / norm,
                jnp.linalg.norm(linear_w - planted) / norm, jnp.maximum(relu_gap, linear_gap))

    return jax.jit(jax.vmap(trial, in_axes=(0, None)))


def crossing(ps: list[int], rates: list[float]) -> float | None:
    """The P where the success rate first reaches 0.5 (linear interpolation), None if never."""
    for i, rate in enumerate(rates):
        if rate >= 0.5:
            if i == 0:
                return float(ps[0])
            p0, p1, r0, r1 = ps[i - 1], ps[i], rates[i - 1], rate
            return p0 + (0.5 - r0) * (p1 - p0) / (r1 - r0)
    return None


def main(argv=None):
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    started = time.perf_counter()
    cells, summary = [], []
    for n in args.n:
        for fraction in args.sparsity:
            s = max(1, round(fraction * n))
            ps = sorted({max(1, round(r * n)) for r in args.ratios})
            rates = {"relu": [], "linear": []}
            for p in ps:
                keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed),
                                                           n * 100003 + s * 1009 + p),
                                        args.trials)
                relu_err, linear_err, worst = (np.asarray(v) for v in make_cell(n, p)(keys, s))
                cell = {"n": n, "s": s, "p": p, "trials": args.trials,
                        "relu_success": float(np.mean(relu_err < SUCCESS)),
                        "linear_success": float(np.mean(linear_err < SUCCESS)),
                        "worst_optimality": float(worst.max())}
                cells.append(cell)
                print(f"  N={n} s={s} P={p}: Net-Trim {cell['relu_success']:.2f}, basis pursuit "
                      f"{cell['linear_success']:.2f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                rates["relu"].append(cell["relu_success"])
                rates["linear"].append(cell["linear_success"])
            scale = s * math.log(n / s)
            row = {"n": n, "s": s, "s_over_n": s / n, "s_log_n_over_s": scale}
            for program in ("relu", "linear"):
                p_star = crossing(ps, rates[program])
                row[f"{program}_p_star"] = p_star
                row[f"{program}_constant"] = None if p_star is None else p_star / scale
            summary.append(row)
            print(json.dumps(row), flush=True)
    payload = {"success_threshold": SUCCESS, "trials": args.trials, "cells": cells,
               "summary": summary, "seconds": time.perf_counter() - started,
               "environment": common.environment()}
    path = pathlib.Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(path, payload)
    plot(payload, path.with_suffix(".png"))


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({c["n"] for c in payload["cells"]})
    fig, axes = plt.subplots(1, len(ns) + 1, figsize=(4.2 * (len(ns) + 1), 3.8))
    for ax, n in zip(axes, ns):
        cells = [c for c in payload["cells"] if c["n"] == n]
        ss = sorted({c["s"] for c in cells})
        ps = sorted({c["p"] for c in cells})
        grid = np.full((len(ss), len(ps)), np.nan)
        linear = np.full_like(grid, np.nan)
        for c in cells:
            grid[ss.index(c["s"]), ps.index(c["p"])] = c["relu_success"]
            linear[ss.index(c["s"]), ps.index(c["p"])] = c["linear_success"]
        x = np.array(ps) / n
        y = np.array(ss) / n
        image = ax.pcolormesh(x, y, grid, shading="nearest", cmap="gray", vmin=0, vmax=1)
        if len(ss) > 1 and len(ps) > 1:  # a contour needs a 2-D grid
            ax.contour(x, y, grid, levels=[0.5], colors="#d62728")
            ax.contour(x, y, linear, levels=[0.5], colors="#1f77b4", linestyles="--")
        ax.plot([], [], color="#d62728", label="Net-Trim (ReLU) 50%")
        ax.plot([], [], color="#1f77b4", ls="--", label="basis pursuit 50%")
        ax.set_xlabel("P / N")
        ax.set_ylabel("s / N")
        ax.set_title(f"exact recovery, N = {n} (white: all trials)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[-1]
    for n, marker in zip(ns, "os^"):
        rows = [r for r in payload["summary"] if r["n"] == n]
        for program, color in (("relu", "#d62728"), ("linear", "#1f77b4")):
            pts = [(r["s_over_n"], r[f"{program}_constant"]) for r in rows
                   if r[f"{program}_constant"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, ls="-" if program == "relu"
                        else "--", label=f"{'Net-Trim' if program == 'relu' else 'BP'}, N={n}")
    ax.set_xlabel("s / N")
    ax.set_ylabel("P* / (s · log(N/s))")
    ax.set_title("Theorem 3's constant (50% success)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
