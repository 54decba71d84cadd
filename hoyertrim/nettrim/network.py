"""Net-Trim over a whole model: the parallel and cascade schemes, and the checked certificate.

The layers are the model's linear maps, found in its computation (`hoyertrim.inspection`): any
linen or NNX model or plain function ``apply(params, x)``, and every contraction with a parameter
in it — Dense, Conv, DenseGeneral, Einsum, attention projections. For every selected map (in the
order the computation runs them) what follows the layer decides the program (`graph`), its
calibration signals are streamed from the real forward pass (`calibration`: the linear program's
Gram sums over every row, or a row subset for the ReLU program), per-channel affine steps before
a ReLU are folded in, the layer is solved (`search.solve_layer`) and unfolded back into the
params tree. Then the original and the pruned model are run (the real forward pass, streamed)
and each layer's certified quantity is measured on its calibration rows; a value above the
certificate raises `CertificateError`. Held-out inputs give the measured discrepancy, the logits' relative error
and the top-1 agreement with the original model.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hoyertrim.inspection import LinearMap, Recorder, as_computation, graph, inspect_model, \
    select_maps
from hoyertrim.inspection.computation import split_variables
from hoyertrim.masks import SparsityReport, sparsity_report
from hoyertrim.nettrim import calibration as calibration_lib
from hoyertrim.nettrim.pruned_layer import PrunedLayer
from hoyertrim.nettrim.pruner import LayerPruner, as_pruner
from hoyertrim.nettrim.search import solve_layer
from hoyertrim.penalties import is_kernel
from hoyertrim.trees import path_string, replace_leaves

# The solver aims this much below the certified ε, so that float32 differences between the
# layer matrices it measures on and the model's own forward pass cannot cross the bound.
_SOLVE_MARGIN = 1e-3
_FLOAT_SLACK = 1e-6  # relative: measured values within float32 resolution of ε pass


class CertificateError(AssertionError):
    """A measured discrepancy exceeds its certificate: a bug, never to pass silently."""


@dataclasses.dataclass
class PrunedNetwork:
    """Output of `prune_network`.

    Attributes:
      params: pruned params, the input tree's exact structure (linen params, NNX ``State``,
        any pytree).
      masks: bool tree shaped like params (True = kept; every linear map's kernel: its
        nonzeros; other leaves all True).
      layers: per-layer `PrunedLayer` records in call order (program and why, ε requested and
        certified, the solver's and the forward pass's measured discrepancy, kept fraction,
        fallback, solver statistics).
      scheme: "parallel" or "cascade".
      variables: linen: all collections (params replaced), when a variables dict with other
        collections was given.
      heldout: on held-out inputs: samples, logits_relative_error, top1_agreement.
      module: NNX: the pruned module (a new one; the original is unchanged).
      kernels: the paths of every linear map's kernel (what the report counts).
    """

    params: Any
    masks: Any
    layers: dict[str, PrunedLayer]
    scheme: str
    variables: Any = None
    heldout: dict | None = None
    module: Any = None
    kernels: tuple[str, ...] = ()

    def report(self, model=None, input_shape=None,
               apply_kwargs: Mapping | None = None) -> SparsityReport:
        """The network's `SparsityReport` (every kernel layer; with ``model`` and
        ``input_shape`` also FLOPs), each pruned layer's Net-Trim facts in its ``details`` and
        the scheme and held-out figures in the report's ``details``."""
        state = {k: v for k, v in (self.variables or {}).items() if k != "params"}
        kernels = set(self.kernels)
        where = (lambda path, leaf: path_string(path) in kernels) if kernels else is_kernel
        report = sparsity_report(self.params, model, input_shape, model_state=state,
                                 apply_kwargs=apply_kwargs, where=where)
        if model is None:  # no trace: the pruned layers in their call order, then the rest
            order = {name: i for i, name in enumerate(self.layers)}
            report.layers.sort(key=lambda layer: order.get(layer.name, len(order)))
        for layer in report.layers:
            if layer.name in self.layers:
                layer.details = self.layers[layer.name].as_dict()
        report.details = {"method": "nettrim", "scheme": self.scheme, "heldout": self.heldout,
                          "kernels": list(self.kernels)}
        return report


def _per_layer(value, names: Sequence[str], what: str) -> dict[str, float | None]:
    if value is None:
        return {n: None for n in names}
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{what} has no value for layers {missing}.")
        return {n: float(value[n]) for n in names}
    if np.isscalar(value):
        return {n: float(value) for n in names}
    value = list(value)
    if len(value) != len(names):
        raise ValueError(f"Got {len(value)} values of {what} for {len(names)} layers {names}.")
    return dict(zip(names, map(float, value)))


def _quantity(follower: graph.Follower, z: np.ndarray) -> np.ndarray:
    """What the layer's certificate bounds, from its output rows z (rows, M): relu(scale·z +
    shift) for the ReLU program, z itself for the linear one."""
    z = np.asarray(z, np.float64)
    if follower.program == "relu":
        return np.maximum(follower.scale * z + follower.shift, 0)
    return z


def _relative(new: np.ndarray, old: np.ndarray) -> float:
    norm = float(np.linalg.norm(old))
    return float(np.linalg.norm(new - old)) / norm if norm > 0 else float(np.linalg.norm(new))


def prune_network(model, variables, images, *, epsilon=None, kept_fraction=None,
                  scheme: str = "parallel", gamma: float = 1.1,
                  layers: Sequence[str] | None = None,
                  activations: Mapping[str, str] | None = None,
                  apply_kwargs: Mapping | None = None, heldout=0.1, max_rows: int = 20000,
                  batch_size: int | None = None, key=None,
                  solver: LayerPruner | Callable = solve_layer,
                  devices: Sequence[jax.Device] | None = None, progress: bool = True,
                  within_nonzeros: bool = False,
                  solved: Mapping[str, tuple[PrunedLayer, Any]] | None = None,
                  on_layer: Callable[[str, PrunedLayer, Any], None] | None = None,
                  **solver_kwargs) -> PrunedNetwork:
    """Net-Trim over every linear map of a model (Dense, Conv, DenseGeneral, Einsum, attention
    projections — any contraction of the input with a parameter; see `hoyertrim.inspection`).

    Args:
      model: a linen module, an NNX module (run in inference mode) or a plain function
        ``apply(params, x)``.
      variables: linen: the trained ``params`` tree or the full variables dict (``params``,
        ``batch_stats``, …; collections other than params come back unchanged); NNX: None (the
        module's own params) or its ``nnx.State`` of params; a function: its params pytree.
      images: (P, ...) inputs whose layer signals define the problems (e.g. training images).
      epsilon: relative discrepancy: one for all layers, one per selected layer, or a mapping
        {layer: ε}. In the cascade scheme it is used for the first layer; later layers use the
        γ rule below.
      kept_fraction: instead of epsilon, the fraction of each layer's weights to keep (one, one
        per layer, or a mapping); each layer is certified at the discrepancy it reaches.
      scheme: ``"parallel"`` (every layer sees the trained network's signals; layers independent)
        or ``"cascade"`` (each layer sees the already-pruned layers' outputs, its target is the
        trained output, ``v = x̂·W`` and ε_ℓ = √γ·‖act(x̂W) − y‖/‖y‖, so the trained weights are
        feasible).
      gamma: the cascade inflation γ > 1.
      layers: names of the layers to prune (`trees.layer_name` of the kernel's path, e.g.
        ``"dense0"``, ``"block0/attn/query"``; default: every linear map). A parameter that is
        not a prunable map (shared, batched, inside a loop) is refused by name, with the reason.
      activations: per-layer override of the program, ``{"dense0": "relu" | "linear"}``
        (default: read off the model's computation graph; see `graph`).
      apply_kwargs: keyword arguments each call of the model needs, e.g. ``{"train": False}``.
      heldout: held-out inputs (array), or the fraction of ``images`` to hold out (default
        0.1; 0 disables). Not used to solve; reported on.
      max_rows: a layer with more signal rows (conv: images × positions) uses a random subset —
        except a map with the linear program and a solver that takes its Gram form
        (`solve_layer`, `solve_layer_nm`, the peers): it is solved on all its rows as their Gram
        sums, streamed (`calibration`), so the calibration set is bounded by time, not memory.
      batch_size: images per forward pass (default: as many as keep one batch's recorded
        signals within 64 MiB, at most 1000).
      key: PRNG key for the row subsets and the held-out split.
      solver: a `pruner.LayerPruner` — any of `hoyertrim.pruners.PRUNERS` (Net-Trim's
        programs; the one-shot peers of `hoyertrim.peers`, with ``kept_fraction``, and
        ``nm=(N, M)`` for N:M patterns) — or a solver function (`solve_layer`,
        `units.solve_layer_units`, a user's own), described by its signature (`as_pruner`).
      devices: parallel scheme only: solve the (independent) layers concurrently, one worker per
        device (e.g. ``jax.devices()``); the result is the same as on one device. Default: one
        layer after another, each spread over all devices along its neurons.
      progress: progress bars (layers; each layer's λ search).
      within_nonzeros: keep every pruned weight at zero: each layer is re-fit on the support of
        its current nonzeros (e.g. a network already pruned by DeepHoyer), so it only gets
        sparser.
      solved: layers already solved with these same arguments, ``{layer: (report, layer)}`` as
        ``on_layer`` received them (e.g. read back after an interruption): not solved again;
        the cascade's later layers see them as pruned. Their certificates are measured with
        the rest.
      on_layer: called as ``on_layer(name, report, layer)`` after each layer is solved, where
        ``layer`` is ``(kernel matrix (n_in, n_out), bias or None)`` or None (the trained
        weights kept), e.g. to save it so that an interrupted run can resume.
      **solver_kwargs: passed to the solver.

    Returns:
      A `PrunedNetwork` whose every layer's certificate was measured by a real forward pass.

    Raises:
      CertificateError: a measured discrepancy exceeds its certificate (a bug).
    """
    if scheme not in ("parallel", "cascade"):
        raise ValueError(f"scheme must be 'parallel' or 'cascade', got {scheme!r}.")
    if scheme == "cascade" and gamma <= 1:
        raise ValueError(f"gamma must be > 1 so the trained weights stay feasible, got {gamma}.")
    if (epsilon is None) == (kept_fraction is None):
        raise ValueError("Give exactly one of epsilon and kept_fraction.")
    if devices is not None and scheme != "parallel":
        raise ValueError("devices= solves layers concurrently, which only the parallel scheme "
                         "allows (a cascade layer needs the pruned layers before it).")
    pruner = as_pruner(solver)
    if pruner.one_shot and kept_fraction is None:
        raise ValueError(f"{pruner.name} fixes a sparsity, not an error: give kept_fraction "
                         "(N/M with nm=(N, M)), not epsilon.")
    key = jax.random.PRNGKey(0) if key is None else key
    frozen = isinstance(variables, flax.core.FrozenDict)
    computation = as_computation(model, variables, apply_kwargs=apply_kwargs)
    params = computation.params
    images = np.asarray(images)
    calibration, held = _split_heldout(images, heldout, key)

    found = inspect_model(computation=computation, sample=calibration[:2])
    maps = {m.name: m for m in select_maps(found.maps, found.refusals, layers)}
    names = list(maps)
    epsilons = _per_layer(epsilon, names, "epsilon")
    fractions = _per_layer(kept_fraction, names, "kept_fraction")
    followers = graph.override({n: found.followers[n] for n in names}, activations,
                               lambda n: maps[n].num_outputs)

    if batch_size is None:
        batch_size = calibration_lib.batch_size_for(list(maps.values()))
    record = Recorder(computation, list(maps.values()), batch_size)
    # The linear program is solved on all its rows, as their Gram sums, by a solver that takes
    # them: its cost and memory no longer grow with P. Other layers get a row subset.
    takes_gram = pruner.takes_gram and solver_kwargs.get("form", "auto") != "rows"
    plans = {name: calibration_lib.row_plan(
        maps[name], len(calibration), gram=takes_gram and followers[name].program == "linear",
        max_rows=max_rows, key=key, index=index) for index, name in enumerate(names)}
    solved = dict(solved or {})
    unknown = sorted(set(solved) - set(names))
    if unknown:
        raise ValueError(f"solved= names layers that are not pruned here: {', '.join(unknown)}.")
    original = calibration_lib.gather(record, {n: m for n, m in maps.items() if n not in solved},
                                      plans, calibration, params)
    inner_progress = progress and (devices is None or len(devices) == 1)

    def prune(name, signals, cascade=False, concurrent=False):
        # Concurrent layers each own a device: no spreading of one layer over all of them.
        extra = {"shard": False} if concurrent and "shard" in pruner.options else {}
        result = _prune_layer(
            maps[name], params, followers[name], signals, cascade=cascade,
            epsilon=epsilons[name], kept_fraction=fractions[name], gamma=gamma,
            solver=pruner, within_nonzeros=within_nonzeros,
            solver_kwargs={**solver_kwargs, **extra, **(
                {"progress": inner_progress} if "progress" in pruner.options else {})})
        if on_layer is not None:
            on_layer(name, *result)
        return result

    pruned, reports = params, {}
    bar = tqdm(total=len(names), initial=len(solved), desc=f"Net-Trim ({scheme})", unit="layer",
               disable=not progress)
    if devices is not None and len(devices) > 1:
        results = _solve_on_devices([n for n in names if n not in solved], devices,
                                    lambda name, concurrent: prune(
                                        name, original[name], concurrent=concurrent), bar)
        results.update(solved)
    else:
        results = {}
        for index, name in enumerate(names):
            if name in solved:
                results[name] = solved[name]
                pruned = _with_layer(pruned, maps[name], results[name][1])
                continue
            cascade = scheme == "cascade" and index > 0
            # The cascade's layer sees the pruned layers' outputs, its target stays trained.
            signals = calibration_lib.gather(
                record, {name: maps[name]}, plans, calibration, params,
                input_params=pruned)[name] if cascade else original.pop(name)
            results[name] = prune(name, signals, cascade)
            del signals
            pruned = _with_layer(pruned, maps[name], results[name][1])
            bar.update()
            bar.set_postfix(layer=name, kept=f"{results[name][0].kept_fraction:.3f}",
                            disc=f"{results[name][0].discrepancy:.3f}")
    bar.close()
    for name in names:  # call order, however the layers were scheduled
        reports[name], new_layer = results[name]
        pruned = _with_layer(pruned, maps[name], new_layer)

    del original
    network = _check(record, params, pruned, maps, followers, plans, reports, calibration, held,
                     scheme)
    network.masks = _map_nonzero_masks(network.params, found.maps)
    network.kernels = tuple(m.path for m in found.maps)
    rebuilt = computation.rebuild(network.params)
    if computation.kind == "nnx":
        network.module = rebuilt
    elif computation.kind == "linen" and isinstance(rebuilt, Mapping) and set(rebuilt) - {"params"}:
        network.variables = rebuilt
    if frozen:  # give back the structure that came in
        network.params, network.masks = (flax.core.freeze(t) for t in (network.params,
                                                                        network.masks))
        if network.variables is not None:
            network.variables = flax.core.freeze(network.variables)
    return network


def _with_layer(params, lmap: LinearMap, layer):
    """``params`` with a solved layer ``(kernel matrix, bias)`` written back (None: unchanged)."""
    return params if layer is None else lmap.with_matrix(params, *layer)


def _map_nonzero_masks(params, maps) -> Any:
    """True where a linear map's kernel is nonzero (pruned weights are exact zeros); every
    other leaf (biases, norms, embeddings) all True."""
    leaves, structure = jax.tree.flatten(params)
    kernels = {m.kernel_leaf for m in maps}
    return jax.tree.unflatten(structure, [
        (jnp.asarray(leaf) != 0) if i in kernels else jnp.ones(jnp.shape(leaf), bool)
        for i, leaf in enumerate(leaves)])


def _solve_on_devices(names, devices, prune, bar) -> dict:
    """The parallel scheme's layers solved concurrently, each on one device (round robin over
    ``devices``; JAX releases the GIL while a device computes). Every solve is the same
    computation as on one device, so the result is too."""
    import concurrent.futures

    def on(device, name):
        with jax.default_device(device):
            return prune(name, concurrent=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = {pool.submit(on, devices[i % len(devices)], name): name
                   for i, name in enumerate(names)}
        results = {}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    return results


def _split_heldout(images, heldout, key):
    if not isinstance(heldout, (int, float)):
        return images, np.asarray(heldout)
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be a fraction in [0, 1) or an array, got {heldout}.")
    count = int(round(heldout * len(images)))
    if count == 0:
        return images, None
    if len(images) - count < 2:
        raise ValueError(f"{len(images)} images leave too few for calibration after holding "
                         f"out {count}; pass more images or heldout=0.")
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 7919), len(images)))
    return images[np.sort(order[count:])], images[np.sort(order[:count])]


def _prune_layer(lmap: LinearMap, params, follower, signals: calibration_lib.LayerSignals, *,
                 cascade: bool, epsilon, kept_fraction, gamma, solver: LayerPruner, solver_kwargs,
                 within_nonzeros=False):
    """One map's solve on its calibration ``signals`` (in the cascade, ``cascade=True``: inputs
    from the pruned network, targets from the trained one): its report and ``(kernel matrix,
    bias)`` to write back, or None for the trained layer."""
    kernel = lmap.matrix(params).astype(np.float64)
    bias = lmap.bias(params)
    support = lmap.support()
    if within_nonzeros:
        support = (kernel != 0) if support is None else (support & (kernel != 0))
    num_outputs = kernel.shape[1]
    relu = follower.program == "relu"
    # Fold the per-channel affine map before the ReLU: relu(a⊙z + c) = relu(x·(W a) + (a b + c)).
    scale = follower.scale if relu else np.ones(num_outputs)
    shift = follower.shift if relu else np.zeros(num_outputs)
    folded_kernel = kernel * scale
    folded_bias = None if bias is None else scale * bias + shift
    offset = shift if bias is None else np.zeros(num_outputs)
    gram = signals.gram
    x = signals.inputs
    target = None if gram is not None else _quantity(follower, signals.outputs).astype(np.float32)
    v, certified, mode = None, epsilon, "epsilon"
    trained_discrepancy = 0.0  # of the trained weights: 0 on the trained network's inputs
    if cascade:
        shift_all = offset if bias is None else folded_bias
        if gram is not None:  # the linear program: scale 1, shift 0
            trained_discrepancy = float(np.sqrt(gram.misfit(folded_kernel, shift_all).sum()
                                                / max(gram.y_squares.sum(), 1e-300)))
        else:
            v = x @ folded_kernel + shift_all
            trained = np.maximum(v, 0) if relu else v
            trained_discrepancy = _relative(trained, target)
            v = v.astype(np.float32) if relu else None
        if kept_fraction is None:
            certified = max(math.sqrt(gamma) * trained_discrepancy, 1e-6)
    extra = {}
    if bias is None:
        extra["fit_bias"] = False
    if np.any(offset != 0):
        extra["offset"] = offset
    if support is not None:
        extra["support"] = support
    if solver.structured:
        extra["groups"] = lmap.input_units
    if solver.trained_weights:
        extra.update(trained_kernel=folded_kernel, trained_bias=folded_bias)
    if kept_fraction is not None:
        extra["kept_fraction"], mode = kept_fraction, "kept_fraction"
    else:
        extra["epsilon"] = certified * (1 - _SOLVE_MARGIN)
    if extra.get("epsilon", 0) >= 1:
        # The pruned layers before moved this layer's inputs so far that even its trained
        # weights are off by ≥ 1/√γ: nothing to prune; the trained weights keep ε = √γ·that.
        solution = None
    else:
        if gram is not None:
            extra["gram"] = gram
        solution = solver(x, target, relu=relu, v=v, **extra, **solver_kwargs)
    requested = certified if kept_fraction is None else None
    if kept_fraction is not None:
        certified = solution.epsilon
    fallback = None
    if solution is None:
        fallback = (f"the trained weights' own discrepancy on the pruned inputs is "
                    f"{trained_discrepancy:.4g}; nothing pruned")
        new_layer = None
    elif solution.discrepancy > certified * (1 - _SOLVE_MARGIN / 2) and kept_fraction is None:
        # The trained weights are always feasible (exactly, in parallel; by √γ, in cascade).
        fallback = (f"solve infeasible (discrepancy {solution.discrepancy:.4g} > ε "
                    f"{certified:.4g}); kept the trained weights")
        new_layer = None
    else:
        a = np.where(scale != 0, scale, 1.0)
        new_kernel = np.where(scale != 0, solution.kernel / a, 0.0)
        new_bias = None
        if bias is not None:
            new_bias = np.where(scale != 0, (solution.bias - shift) / a, bias)
        new_layer = (new_kernel, new_bias)
    kept = int(np.count_nonzero(kernel if new_layer is None else new_layer[0]))
    weights = lmap.weights
    solve = {} if solution is None else solution.summary()
    for key in ("epsilon", "kept_fraction"):  # the layer's own figures replace the solver's
        solve.pop(key, None)
    if fallback:  # what is returned is the trained layer, feasible at the certified ε
        solve.update(discrepancy=trained_discrepancy, feasible=True)
    report = PrunedLayer(
        program=follower.program, reason=follower.reason,
        bounds=("‖relu(ẑ) − relu(z)‖_F ≤ ε‖relu(z)‖_F (post-activation"
                + (", batch-norm/affine folded" if np.any(scale != 1) or np.any(shift != 0)
                   else "") + ")") if relu else "‖ẑ − z‖_F ≤ ε‖z‖_F (pre-activation)",
        mode=mode, epsilon_requested=requested, epsilon_certified=certified,
        activation=follower.activation, lipschitz=follower.lipschitz,
        samples=int(signals.rows if gram is not None else x.shape[0]),
        weights=weights, kept_weights=kept, kept_fraction=kept / weights, fallback=fallback,
        **solve)
    return report, new_layer


def _measure_layers(record, params, pruned, maps, followers, plans, images, scheme
                    ) -> dict[str, float]:
    """Per layer, the measured relative discrepancy of its certified quantity in the real
    forward pass, over the rows its plan solved on: the layer alone pruned (parallel) or the
    whole pruned network (cascade)."""
    def quantity(name, z):
        return _quantity(followers[name], z)

    if scheme == "cascade":
        return calibration_lib.relative_discrepancy(record, maps, plans, images, params, pruned,
                                                    quantity)
    measured = {}
    pruned_leaves = jax.tree.leaves(pruned)
    for name, lmap in maps.items():
        own = [i for i in (lmap.kernel_leaf, lmap.bias_leaf) if i is not None]
        alone = replace_leaves(params, {i: pruned_leaves[i] for i in own})
        measured.update(calibration_lib.relative_discrepancy(
            record, {name: lmap}, plans, images, params, alone, quantity))
    return measured


def _check(record, params, pruned, maps, followers, plans, reports, calibration, held,
           scheme) -> PrunedNetwork:
    names = list(maps)
    measured = _measure_layers(record, params, pruned, maps, followers, plans, calibration,
                               scheme)
    for name in names:
        report = reports[name]
        report.measured = measured[name]
        if measured[name] > report.epsilon_certified * (1 + _FLOAT_SLACK) + _FLOAT_SLACK:
            raise CertificateError(
                f"Layer {name!r}: the forward pass measures a discrepancy of {measured[name]:.6g} "
                f"on the calibration rows, above its certificate ε = "
                f"{report.epsilon_certified:.6g} ({report.bounds}). This is a bug in hoyertrim; "
                "please report it.")
        if report.lipschitz is not None:
            # ‖σ(ẑ) − σ(z)‖ ≤ L‖ẑ − z‖ ≤ L·ε‖z‖: the bound the certificate implies on the output.
            report.output_bound = report.lipschitz * report.epsilon_certified
    heldout = None
    if held is not None and len(held):
        every_row = dict.fromkeys(names, calibration_lib.ALL)
        held_measured = _measure_layers(record, params, pruned, maps, followers, every_row,
                                        held, scheme)
        for name in names:
            reports[name].heldout_measured = held_measured[name]
        heldout = {"samples": int(len(held)),
                   **calibration_lib.compare_outputs(record, held, params, pruned)}
    pruned = jax.tree.map(jnp.asarray, pruned)
    return PrunedNetwork(params=pruned, masks=None, layers=reports, scheme=scheme,
                         heldout=heldout)


def save_pruned(directory, network: PrunedNetwork) -> None:
    """Writes ``params``, ``masks``, the other collections (orbax) and the report (JSON)."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(directory).expanduser().absolute()
    items = dict(params=ocp.args.StandardSave(network.params),
                 masks=ocp.args.StandardSave(network.masks),
                 report=ocp.args.JsonSave(network.report().as_dict()))
    if network.variables is not None:
        state = {k: v for k, v in network.variables.items() if k != "params"}
        items["state"] = ocp.args.StandardSave(state)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**items), force=True)


def load_pruned(directory, template) -> PrunedNetwork:
    """Restores what `save_pruned` wrote into the structure of ``template`` (a params tree, or
    the variables dict when other collections were saved)."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(directory).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"No pruned network at {path}.")
    params_template, collections, _ = split_variables(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_template)
    mask_abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), jnp.bool_),
                                 params_template)
    items = dict(params=ocp.args.StandardRestore(abstract),
                 masks=ocp.args.StandardRestore(mask_abstract), report=ocp.args.JsonRestore())
    if collections:
        items["state"] = ocp.args.StandardRestore(
            jax.tree.map(ocp.utils.to_shape_dtype_struct, collections))
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, ocp.args.Composite(**items))
    except Exception as error:  # orbax raises many types for a damaged directory
        raise ValueError(f"Could not restore the pruned network at {path}: it is incomplete, "
                         f"damaged or of another model ({type(error).__name__}: {error}).") \
            from error
    report = restored["report"]
    variables = None
    if collections:
        variables = {"params": restored["params"], **restored["state"]}
    layers = {layer["name"]: PrunedLayer.from_dict(layer["details"])
              for layer in report["layers"] if layer["details"]}
    return PrunedNetwork(params=restored["params"], masks=restored["masks"], layers=layers,
                         scheme=report["details"]["scheme"], variables=variables,
                         heldout=report["details"].get("heldout"),
                         kernels=tuple(report["details"].get("kernels", ())))
