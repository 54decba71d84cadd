"""How Net-Trim's per-layer errors add up through a network, measured against the bounds.

    python experiments/nettrim_error_propagation.py [--epsilons 0.02 0.05 0.1 0.2]

On the dense LeNet-300-100 and 784-300-1000-100-10 of `experiments/run.py` (the same stage
directories, trained if absent), for each ε and both schemes: every layer's actual discrepancy
in the pruned network, e_ℓ = ‖ŷ_ℓ − y_ℓ‖_F (ŷ_ℓ: layer ℓ's output when the pruned network runs;
y_ℓ: the trained network's; post-ReLU for hidden layers, logits for the last), on the
calibration images (where the certificates hold) and on held-out validation images, against:

Parallel scheme (every layer solved on the trained network's signals, ‖relu(y_{ℓ−1}Ŵ_ℓ) − y_ℓ‖_F
≤ ε_ℓ‖y_ℓ‖_F). ReLU is 1-Lipschitz, so

    e_ℓ ≤ ‖relu(ŷ_{ℓ−1}Ŵ_ℓ) − relu(y_{ℓ−1}Ŵ_ℓ)‖ + ‖relu(y_{ℓ−1}Ŵ_ℓ) − y_ℓ‖ ≤ ‖Ŵ_ℓ‖₂ e_{ℓ−1} + ε_ℓ‖y_ℓ‖,

    e_L ≤ Σ_ℓ ε_ℓ‖y_ℓ‖ Π_{k>ℓ} ‖Ŵ_k‖₂                                  ("bound", holds always)

(the bias row of Ŵ multiplies the ones column, which is the same in both networks). For a
link-normalized network — weights rescaled, as ReLU's positive homogeneity allows, so that each
layer's matrix has norm ≤ 1 — the products are ≤ 1 and this is Net-Trim's Theorem 1 as we read
it: e_L ≤ Σ_ℓ ε_ℓ‖y_ℓ‖ (the "plain sum"). Trained networks are not normalized (‖Ŵ‖₂ is printed),
so the plain sum is *not* a bound for them; the experiment shows by how much it misses or holds.

Cascade scheme (layer ℓ solved on the pruned network's inputs ŷ_{ℓ−1} against y_ℓ with
ε_ℓ‖y_ℓ‖ = √γ·‖relu(ŷ_{ℓ−1}W_ℓ) − y_ℓ‖, the trained W_ℓ on the pruned inputs). The certificate
is already network-level, e_ℓ ≤ ε_ℓ‖y_ℓ‖, and since ‖relu(ŷW) − relu(yW)‖ ≤ ‖W_ℓ‖₂ e_{ℓ−1},

    e_L ≤ ε_1‖y_1‖ Π_{k≥2} √γ ‖W_k‖₂,

which for a link-normalized network is Net-Trim's Theorem 2 as we read it, e_L ≤ γ^{(L−1)/2}
ε_1‖y_1‖. (We could not consult the paper's text here; the two statements above are our
derivations, which reduce to the published forms under their stated normalization.)

Writes results/nettrim_error_propagation.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np

import common
from hoyertrim import nettrim, pipeline
from hoyertrim.inspection import record_maps
from run import DENSE_FC, DENSE_LENET300100

DENSE = {"lenet300100": DENSE_LENET300100[1], "nettrim_fc": DENSE_FC[1]}


def layer_outputs(model, params, images) -> dict[str, np.ndarray]:
    """Each kernel layer's output in call order: post-ReLU for hidden layers, logits last."""
    captured = record_maps(model, {"params": params}, images)
    names = list(captured)
    return {name: (np.asarray(captured[name][1], np.float64) if name == names[-1]
                   else np.maximum(np.asarray(captured[name][1], np.float64), 0))
            for name in names}


def spectral(kernel) -> float:
    return float(np.linalg.norm(np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]), 2))


def analyse(model, params, pruned, calibration, heldout, gamma):
    """Per layer: measured e_ℓ (absolute and relative) on both image sets, and the bounds."""
    trained = layer_outputs(model, params, calibration)
    after = layer_outputs(model, pruned.params, calibration)
    trained_h = layer_outputs(model, params, heldout)
    after_h = layer_outputs(model, pruned.params, heldout)
    rows, general, plain, cascade_general, cascade_normalized = [], 0.0, 0.0, None, None
    for index, name in enumerate(trained):
        y_norm = float(np.linalg.norm(trained[name]))
        certified = pruned.layers[name].epsilon_certified * y_norm
        w_hat, w = spectral(pruned.params[name]["kernel"]), spectral(params[name]["kernel"])
        general = w_hat * general + certified
        plain += certified
        if index == 0:
            cascade_general = cascade_normalized = certified
        else:
            cascade_general *= math.sqrt(gamma) * w
            cascade_normalized *= math.sqrt(gamma)
        error = float(np.linalg.norm(after[name] - trained[name]))
        error_h = float(np.linalg.norm(after_h[name] - trained_h[name]))
        rows.append({
            "layer": name, "y_norm": y_norm, "epsilon": pruned.layers[name].epsilon_certified,
            "measured": error / y_norm,
            "heldout_measured": error_h / float(np.linalg.norm(trained_h[name])),
            "parallel_bound": general / y_norm, "plain_sum": plain / y_norm,
            "cascade_bound": cascade_general / y_norm,
            "cascade_normalized": cascade_normalized / y_norm,
            "spectral_norm_pruned": w_hat, "spectral_norm_trained": w,
            "l1_norm_trained": float(np.abs(np.asarray(params[name]["kernel"])).sum()),
            "kept_fraction": pruned.layers[name].kept_fraction})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(DENSE), default=sorted(DENSE))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--samples", type=int, default=3000, help="calibration training images")
    parser.add_argument("--heldout", type=int, default=2000, help="validation images")
    parser.add_argument("--gamma", type=float, default=1.1, help="the cascade's γ")
    parser.add_argument("--results", default="results/nettrim_error_propagation.json")
    parser.add_argument("--root", default="runs/pipeline", help="where stage directories go")
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="override the dense models' epochs (default: experiments/run.py's)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    path = pathlib.Path(args.results)
    payload = json.loads(path.read_text()) if path.exists() else {"points": []}
    done = {(p["model"], p["scheme"], p["epsilon"]) for p in payload["points"]}
    for name in args.models:
        settings = dict(DENSE[name])
        if args.dense_epochs:
            settings["epochs"] = args.dense_epochs
        dense_dir = common.dense_stage(settings, root=args.root, data_dir=args.data_dir,
                                       progress=not args.no_progress)
        dense = pipeline.load(dense_dir)
        dataset = pipeline.load_data(dense.manifest, args.data_dir)
        calibration = dataset.train.images[:args.samples]
        heldout = dataset.validation.images[:args.heldout]
        for scheme in ("parallel", "cascade"):
            for epsilon in args.epsilons:
                if (name, scheme, epsilon) in done:
                    continue
                started = time.perf_counter()
                pruned = nettrim.prune_network(dense.model, dense.params, calibration,
                                               epsilon=epsilon, scheme=scheme, gamma=args.gamma,
                                               heldout=0, progress=not args.no_progress)
                rows = analyse(dense.model, dense.params, pruned, calibration, heldout,
                               args.gamma)
                payload["points"].append({
                    "model": name, "dense": str(dense_dir), "scheme": scheme,
                    "epsilon": epsilon, "gamma": args.gamma, "samples": args.samples,
                    "heldout": args.heldout, "seconds": time.perf_counter() - started,
                    "kept_fraction": pruned.report().kept_fraction, "layers": rows})
                last = rows[-1]
                print(f"{name} {scheme} ε={epsilon:g}: output measured {last['measured']:.4f} "
                      f"(held-out {last['heldout_measured']:.4f}); bound "
                      f"{last['parallel_bound' if scheme == 'parallel' else 'cascade_bound']:.4f}"
                      f", plain sum {last['plain_sum']:.4f}", flush=True)
                payload["environment"] = common.environment()
                path.parent.mkdir(parents=True, exist_ok=True)
                common.write_json(path, payload)
    plot(payload, path.with_suffix(".png"))
    return payload


def plot(payload, out):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({p["model"] for p in payload["points"]})
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        for col, scheme in enumerate(("parallel", "cascade")):
            ax = axes[row][col]
            points = sorted((p for p in payload["points"]
                             if p["model"] == name and p["scheme"] == scheme),
                            key=lambda p: p["epsilon"])
            if not points:
                continue
            eps = [p["epsilon"] for p in points]
            last = [p["layers"][-1] for p in points]
            series = [("measured (calibration)", "measured", "o-"),
                      ("measured (held-out)", "heldout_measured", "s--")]
            if scheme == "parallel":
                series += [("bound Σε‖y‖Π‖Ŵ‖₂", "parallel_bound", "^-"),
                           ("plain sum Σε (Theorem 1 if normalized)", "plain_sum", "v:")]
            else:
                series += [("bound ε₁Π√γ‖W‖₂", "cascade_bound", "^-"),
                           ("ε₁γ^((L−1)/2) (Theorem 2 if normalized)", "cascade_normalized",
                            "v:"),
                           ("certified ε_L", "epsilon", "x-")]
            for label, key, style in series:
                ax.plot(eps, [layer[key] for layer in last], style, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(eps, [f"{e:g}" for e in eps])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("ε (first layer; parallel: every layer)")
            ax.set_ylabel("output discrepancy / ‖y_L‖")
            ax.set_title(f"{name}, {scheme}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
