"""Pruning stages: a rule on the weights (`prune`), and the layer-wise methods on calibration
images — Net-Trim or a one-shot peer (`nettrim`)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time

import jax
import numpy as np

from hoyertrim import masks as masks_lib
from hoyertrim import nettrim as nettrim_lib
from hoyertrim.distributed import is_writer, writers_text
from hoyertrim.inspection import inspect_model, output_axes, unit_groupings
from hoyertrim.masks import kernel_nonzero_masks
from hoyertrim.pipeline.directory import (
    Stage, StageResult, json_default, new_manifest, stage_result)
from hoyertrim.pipeline.errors import StageError
from hoyertrim.pipeline.network import (
    layer_kernels, load_data, nonzero_counts_like, read_parent, save_network, stage_summary)
from hoyertrim.pruners import get_pruner, pruner_names
from hoyertrim.train import mode_kwargs


PRUNE_RULES = ("threshold", "std", "magnitude", "global_magnitude", "group", "group_std",
               "units")


def prune_masks(params, rule: str, value: float, groupings=None):
    """Masks of one pruning rule (`PRUNE_RULES`) at ``value``.

    ``threshold``: |w| < value; ``std``: |w| < value·std(w) per tensor (DeepHoyer's rule);
    ``magnitude`` / ``global_magnitude``: the smallest weights to sparsity ``value`` per layer /
    over all layers; ``group``: whole units with group norm < value·max; ``group_std``: units
    with group norm < value·std of the group norms; ``units``: the fraction ``value`` of each
    layer's input units with the smallest group norms (`masks.input_unit_masks`).
    ``groupings``: each layer's units as kernel axes for the group rules
    (`inspection.unit_groupings`; default: DeepHoyer's output and input axes).
    """
    if rule not in PRUNE_RULES:
        raise StageError(f"Unknown prune rule {rule!r}; choose one of {', '.join(PRUNE_RULES)}.")
    fraction = rule.endswith("magnitude") or rule == "units"
    if not math.isfinite(value) or value < 0 or (fraction and not value < 1):
        raise StageError(f"The {rule} rule needs a value in "
                         f"{'[0, 1)' if fraction else '[0, ∞)'}, got {value}.")
    if rule == "threshold":
        return masks_lib.threshold_masks(params, value)
    if rule == "std":
        return masks_lib.std_threshold_masks(params, value)
    if rule in ("magnitude", "global_magnitude"):
        return masks_lib.magnitude_masks(params, value,
                                         scope="global" if rule == "global_magnitude" else "layer")
    if rule == "group":
        return masks_lib.group_masks(params, fraction_of_max=value, groupings=groupings)
    if rule == "units":
        return masks_lib.input_unit_masks(params, 1 - value, groupings=groupings)
    return masks_lib.group_masks(params, std_scale=value, groupings=groupings)


def prune(parent, out, *, rule: str = "std", value: float = 0.1, data_dir=None,
          command=None) -> StageResult:
    """One-shot pruning of the parent's weights by a rule (`prune_masks`); no training."""
    parent_manifest, model, loaded = read_parent(parent)
    masks = prune_masks(loaded.params, rule, value)  # checks rule and value before any write
    manifest = new_manifest("prune", {"rule": rule, "value": value}, parent=parent_manifest,
                         parent_dir=parent, command=command)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir)
        if rule in ("group", "group_std", "units"):  # the units the computation shows
            found = inspect_model(model, {"params": loaded.params, **loaded.model_state},
                                  data.train.images[:1], apply_kwargs=mode_kwargs(model, False))
            groupings = unit_groupings(found.maps)
            masks = prune_masks(loaded.params, rule, value, groupings)
            if rule == "group" and found.coupled:  # a stream channel in all its writers at once
                coupled = masks_lib.coupled_group_masks(
                    loaded.params, found.coupled, output_axes(groupings), fraction_of_max=value)
                masks = jax.tree.map(lambda a, b: np.asarray(a) & np.asarray(b), masks, coupled)
        # Kernel masks from the rule, and whatever the parent had pruned stays pruned.
        masks = jax.tree.map(lambda m, old: np.asarray(m) & np.asarray(old), masks,
                             kernel_nonzero_masks(loaded.params))
        params = masks_lib.apply_masks(loaded.params, masks)
        save_network(stage.out, params, masks, loaded.model_state)
        stage.finish(stage_summary(model, params, loaded.model_state, data))
    return stage_result(stage)


ONESHOT_METHODS = pruner_names(one_shot=True)
_LAYERS = "layers"  # an unfinished nettrim stage's solved layers, one .npz each


def _save_layer(folder: pathlib.Path, name: str, report: nettrim_lib.PrunedLayer, layer) -> None:
    """One solved layer (its report and ``(kernel matrix, bias)`` or None), written atomically
    so that a run killed at any point leaves whole files only (by process 0 alone)."""
    if not is_writer():
        return
    folder.mkdir(exist_ok=True)
    arrays = {"name": np.array(name),
              "report": np.array(json.dumps(report.as_dict(), default=json_default))}
    if layer is not None:
        arrays["kernel"] = np.asarray(layer[0])
        if layer[1] is not None:
            arrays["bias"] = np.asarray(layer[1])
    file = folder / f"{name.replace('/', '--')}.npz"
    tmp = folder / f".{file.name}.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, file)


def _solved_layers(folder: pathlib.Path) -> dict:
    """``{layer: (report, layer)}`` of the layers an interrupted run of this stage solved.

    A damaged file is removed (by process 0) and its layer solved again. With several processes
    every one reads the files (stage folders sit on a file system they share, as the parent's
    network does) and all keep process 0's list, so they agree on what is left to solve."""
    solved = {}
    for file in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        try:
            with np.load(file, allow_pickle=False) as arrays:
                layer = None
                if "kernel" in arrays.files:
                    layer = (arrays["kernel"], arrays["bias"] if "bias" in arrays.files else None)
                solved[str(arrays["name"])] = (
                    nettrim_lib.PrunedLayer.from_dict(json.loads(str(arrays["report"]))), layer)
        except (OSError, ValueError, KeyError, TypeError):
            if is_writer():
                file.unlink()  # damaged: that layer is solved again
    agreed = [name for name in writers_text("\n".join(sorted(solved))).split("\n") if name]
    missing = sorted(set(agreed) - set(solved))
    if missing:
        raise StageError(f"Process {jax.process_index()} cannot read the solved layers "
                         f"{', '.join(missing)} that process 0 found in {folder}; the stage "
                         "folder must be on a file system every process shares.")
    return {name: solved[name] for name in agreed}


def nettrim(parent, out, *, epsilon: float | None = None, kept_fraction: float | None = None,
            nm: tuple[int, int] | None = None, like=None, method: str = "nettrim",
            within_nonzeros: bool = False, refit: bool = False, polish: int = 0,
            units: bool = False, scheme: str = "cascade",
            samples: int = 5000, heldout: int = 1000,
            maxiter: int = 300, seed: int = 0, data_dir=None, progress=True,
            command=None) -> StageResult:
    """Layer-wise pruning of the parent network from ``samples`` training images, each layer's
    discrepancy checked by a forward pass on them and measured on ``heldout`` validation images
    (both random subsets drawn with ``seed``: a corpus's windows come file by file, so its first
    ones would all be one file's).

    Args:
      epsilon / kept_fraction / nm / like: Net-Trim's ε, or a kept fraction per layer, or an
        N:M pattern (then only the layers whose input count is a multiple of M are pruned), or
        a stage directory of the same model whose per-layer counts of nonzero kernel weights
        to keep (e.g. a DeepHoyer-pruned stage, to compare methods at the same counts): exact
        for magnitude, SparseGPT and Net-Trim with ``polish``; Wanda rounds per output unit
        and Net-Trim's λ search alone stops near the count.
      method: ``"nettrim"`` (`nettrim.solve_layer`; N:M: `solve_layer_nm`) or a one-shot peer
        (``"sparsegpt"``, ``"wanda"``, ``"magnitude"``: `hoyertrim.peers`; kept fraction or N:M
        only). A peer's stage is called ``oneshot``.
      within_nonzeros: re-fit each layer on its current nonzeros only (a network pruned
        before, e.g. by DeepHoyer, only gets sparser).
      refit: Net-Trim only: debias the kept weights after the λ search (`solve_layer`'s
        ``refit``): the same support, a lower discrepancy.
      polish: Net-Trim only: rounds of debias-then-threshold after each layer's λ search
        (`solve_layer`'s ``polish``): with ε fewer weights at the same ε; with a kept fraction
        a quicker search, the exact count, and a lower discrepancy.
      units: Net-Trim only: prune whole input units of each layer (`nettrim.solve_layer_units`:
        a group norm over the rows reading one unit), so that ``compact`` removes them; with
        ``epsilon`` the fewest units within ε, with ``kept_fraction`` that fraction of units.
      scheme: ``"parallel"`` or ``"cascade"`` (for the peers: sequential, as their papers run).
    """
    if method not in ("nettrim", *ONESHOT_METHODS):
        raise StageError(f"Unknown method {method!r}; choose nettrim, "
                         f"{', '.join(ONESHOT_METHODS)}.")
    if sum(v is not None for v in (epsilon, kept_fraction, nm, like)) != 1:
        raise StageError("Give exactly one of --epsilon, --kept-fraction, --nm and --like.")
    if epsilon is not None and (method != "nettrim" or not 0 < epsilon < 1):
        raise StageError(f"ε must be in (0, 1), got {epsilon}." if method == "nettrim" else
                         f"{method} prunes to a kept fraction or N:M, not to an ε.")
    if kept_fraction is not None and not 0 < kept_fraction <= 1:
        raise StageError(f"The kept fraction must be in (0, 1], got {kept_fraction}.")
    if nm is not None and not (len(nm) == 2 and 0 < nm[0] <= nm[1]):
        raise StageError(f"N:M needs 0 < N ≤ M, got {nm}.")
    if scheme not in ("parallel", "cascade"):
        raise StageError(f"scheme must be 'parallel' or 'cascade', got {scheme!r}.")
    if samples < 1 or heldout < 0 or maxiter < 1:
        raise StageError("samples and maxiter must be >= 1 and heldout >= 0.")
    parent_manifest, model, loaded = read_parent(parent)
    if like is not None:
        like = str(pathlib.Path(like).expanduser().absolute())
        kept_fraction = {name: kept / size for name, (kept, size)
                         in nonzero_counts_like(layer_kernels(loaded.params), like).items()}
        if not all(kept_fraction.values()):
            empty = sorted(name for name, value in kept_fraction.items() if not value)
            raise StageError(f"{like} keeps no weight of {', '.join(empty)}; a layer-wise "
                             "method needs at least one kept weight per layer.")
    config = dict(epsilon=epsilon, kept_fraction=kept_fraction, scheme=scheme, samples=samples,
                  heldout=heldout, maxiter=maxiter, seed=seed, calibration="random subsets")
    if like is not None:
        config["like"] = like
    if nm is not None:
        config["nm"] = list(nm)
    if method != "nettrim":
        config["method"] = method
    if within_nonzeros:
        config["within_nonzeros"] = True
    if refit:
        if method != "nettrim" or nm is not None:
            raise StageError("--refit is Net-Trim's (its N:M mode always re-fits).")
        config["refit"] = True
    if polish:
        if method != "nettrim" or nm is not None or polish < 0:
            raise StageError("--polish is Net-Trim's, with --epsilon or --kept-fraction (its N:M "
                             "mode always re-fits), and takes a count of rounds >= 1.")
        config["polish"] = polish
    if units:
        if method != "nettrim" or nm is not None or like is not None or refit or polish:
            raise StageError("--units is Net-Trim's, with --epsilon or --kept-fraction (it "
                             "always re-fits the kept units).")
        config["units"] = True
    stage_name = "nettrim" if method == "nettrim" else "oneshot"
    manifest = new_manifest(stage_name, config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    solver = get_pruner(method if method != "nettrim" else
                        "nettrim-nm" if nm else "nettrim-units" if units else "nettrim")
    options, layers = {}, None
    if nm is not None:
        options = {"nm": tuple(nm)}
        kept_fraction = nm[0] / nm[1]
        found = inspect_model(model, {"params": loaded.params, **loaded.model_state},
                              load_data(parent_manifest, data_dir).validation.images[:1],
                              apply_kwargs=mode_kwargs(model, False))
        layers = [m.name for m in found.maps if m.num_inputs % nm[1] == 0]
        if not layers:
            raise StageError(f"No layer has an input count that is a multiple of {nm[1]}.")
    if method == "nettrim" and not units:
        options["options"] = nettrim_lib.SolverOptions(maxiter=maxiter, refit=refit,
                                                       polish=polish)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir)
        if samples > len(data.train):
            raise StageError(f"--samples {samples} exceeds the {len(data.train)} training images.")
        variables = {"params": loaded.params, **loaded.model_state}
        rng = np.random.default_rng(seed)
        calibration = data.train.images[np.sort(rng.choice(len(data.train), samples,
                                                           replace=False))]
        held = data.validation.images[np.sort(rng.choice(
            len(data.validation), min(heldout, len(data.validation)), replace=False))]
        started = time.perf_counter()
        # Each solved layer is kept as it finishes: an interrupted run resumes from them.
        folder = stage.out / _LAYERS
        solved = _solved_layers(folder)
        try:
            pruned = nettrim_lib.prune_network(
                model, variables, calibration, epsilon=epsilon,
                kept_fraction=kept_fraction, scheme=scheme, solver=solver, layers=layers,
                heldout=held if heldout else 0,
                apply_kwargs=mode_kwargs(model, False), key=jax.random.PRNGKey(seed),
                progress=progress, within_nonzeros=within_nonzeros, solved=solved,
                on_layer=lambda name, report, layer: _save_layer(folder, name, report, layer),
                **options)
        except (ValueError, NotImplementedError) as error:
            # What the model cannot give (no linear map, a layer refused by name, a bad
            # N:M shape): the user's to fix, said in one line; nothing is written.
            raise StageError(f"Cannot prune {parent}: {error}") from error
        seconds = time.perf_counter() - started
        save_network(stage.out, pruned.params, pruned.masks, loaded.model_state)
        if stage.writer:
            shutil.rmtree(folder, ignore_errors=True)
        layers = {name: layer.as_dict() for name, layer in pruned.layers.items()}
        stage.finish(stage_summary(model, pruned.params, loaded.model_state, data, {
            "layers": layers, "heldout": pruned.heldout, "solve_seconds": seconds,
            "resumed_layers": sorted(solved)}))
    return stage_result(stage)
