"""Runs named pipelines — chains of `hoyertrim.pipeline` stages, one per reported result row —
and writes ``results/pipelines/<name>.json``.

    python experiments/run.py --list
    python experiments/run.py ghs_lenet5 hs_lenet300100

A pipeline is a config: a list of (stage, settings). Each stage goes to
``runs/pipeline/<stage>-<model>-<hash of its settings and parent>``, so pipelines that share a
prefix (the same dense model) share its directories, a rerun reuses finished stages and resumes
interrupted training, and a changed setting gets a new directory. The dense reference and every
pruned network of the chain are evaluated once on the test set; the results file names every
stage's directory (`hoyertrim.load` reads each).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import common
from hoyertrim import pipeline

DENSE_LENET300100 = ("train", {"model": "lenet300100", "epochs": 30})
DENSE_LENET5 = ("train", {"model": "lenet5", "epochs": 20})

CONFIGS: dict[str, list[tuple[str, dict]]] = {
    # The quick start's chain: Net-Trim without fine-tune, then compaction.
    "nettrim_lenet300100": [DENSE_LENET300100,
                            ("nettrim", {"epsilon": 0.1, "scheme": "cascade"}),
                            ("compact", {})],
    # The compaction benchmark's models: DeepHoyer with a short (3-epoch) fine-tune.
    "ghs_lenet5": [DENSE_LENET5,
                   ("regularize", {"penalty": "group_hoyer_square", "strength": 1e-2,
                                   "epochs": 30}),
                   ("prune", {"rule": "std", "value": 0.1}),
                   ("finetune", {"epochs": 3, "learning_rate": 3e-4}),
                   ("compact", {})],
    "hs_lenet300100": [DENSE_LENET300100,
                       ("regularize", {"penalty": "hoyer_square", "strength": 1e-4,
                                       "epochs": 100}),
                       ("prune", {"rule": "std", "value": 0.1}),
                       ("finetune", {"epochs": 3, "learning_rate": 3e-4}),
                       ("compact", {})],
}

# Net-Trim's RQ5: the same architecture (784-300-1000-100-10) trained plain, with dropout, and
# with L1 or Hoyer-Square added for 30 more epochs; then Net-Trim cascade ε = 0.1, no fine-tune.
DENSE_FC = ("train", {"model": "nettrim_fc", "epochs": 30})
NETTRIM_FC = ("nettrim", {"epsilon": 0.1, "scheme": "cascade"})
CONFIGS.update({
    "regnets_plain": [DENSE_FC, NETTRIM_FC],
    "regnets_dropout": [("train", {"model": "nettrim_fc", "model_kwargs": {"dropout_rate": 0.3},
                                   "epochs": 30}), NETTRIM_FC],
    "regnets_l1": [DENSE_FC, ("regularize", {"penalty": "l1", "strength": 2e-5, "epochs": 30}),
                   NETTRIM_FC],
    "regnets_hs": [DENSE_FC, ("regularize", {"penalty": "hoyer_square", "strength": 1e-4,
                                             "epochs": 30}), NETTRIM_FC],
})

# The flagship ("hoyertrim"): DeepHoyer's HS training and pruning, then Net-Trim's certified
# re-fit of what survived (cascade, keeping HS's zeros), then a short distilled fine-tune.
HS_PRUNED_LENET300100 = CONFIGS["hs_lenet300100"][:3]
for _epsilon in (0.05, 0.1, 0.2, 0.3):
    CONFIGS[f"hoyertrim_lenet300100_eps{_epsilon:g}"] = HS_PRUNED_LENET300100 + [
        ("nettrim", {"epsilon": _epsilon, "scheme": "cascade", "within_nonzeros": True}),
        ("finetune", {"epochs": 30, "learning_rate": 3e-4, "distill": True}),
        ("compact", {})]
# The other order: Net-Trim on the HS-regularized network itself (no magnitude rule first).
for _epsilon in (0.1, 0.2, 0.3):
    CONFIGS[f"hoyertrim_from_hs_lenet300100_eps{_epsilon:g}"] = CONFIGS["hs_lenet300100"][:2] + [
        ("nettrim", {"epsilon": _epsilon, "scheme": "cascade"}),
        ("finetune", {"epochs": 30, "learning_rate": 3e-4, "distill": True})]
CONFIGS["hs_distill_lenet300100"] = HS_PRUNED_LENET300100 + [
    ("finetune", {"epochs": 30, "learning_rate": 3e-4, "distill": True})]

# Net-Trim + short fine-tune at ≤ 5% of the weights: cascade with polish (fewer weights at the
# same ε), then a 30-epoch masked fine-tune distilled from the dense model.
for _epsilon in (0.3, 0.35, 0.4, 0.45):
    CONFIGS[f"nettrim_polish_ft_lenet300100_eps{_epsilon:g}"] = [
        DENSE_LENET300100, ("nettrim", {"epsilon": _epsilon, "scheme": "cascade", "polish": 1}),
        ("finetune", {"epochs": 30, "learning_rate": 1e-3, "distill": True})]

# The same budget in two steps: Net-Trim to ~15%, 10 distilled epochs, Net-Trim again on the
# surviving weights, 20 distilled epochs.
for _epsilon in (0.25, 0.3, 0.35):
    CONFIGS[f"nettrim_twice_ft_lenet300100_eps{_epsilon:g}"] = [
        DENSE_LENET300100, ("nettrim", {"epsilon": 0.2, "scheme": "cascade", "polish": 1}),
        ("finetune", {"epochs": 10, "learning_rate": 1e-3, "distill": True}),
        ("nettrim", {"epsilon": _epsilon, "scheme": "cascade", "polish": 1,
                     "within_nonzeros": True}),
        ("finetune", {"epochs": 20, "learning_rate": 1e-3, "distill": True})]

# ... and in three steps of 10 distilled epochs each.
CONFIGS["nettrim_thrice_ft_lenet300100"] = CONFIGS["nettrim_twice_ft_lenet300100_eps0.25"][:3] + [
    ("nettrim", {"epsilon": 0.2, "scheme": "cascade", "polish": 1, "within_nonzeros": True}),
    ("finetune", {"epochs": 10, "learning_rate": 1e-3, "distill": True}),
    ("nettrim", {"epsilon": 0.2, "scheme": "cascade", "polish": 1, "within_nonzeros": True}),
    ("finetune", {"epochs": 10, "learning_rate": 1e-3, "distill": True})]

# A stronger teacher for the distilled fine-tunes: the dense LeNet-5 (~99.3%) instead of the
# chain's own dense LeNet-300-100 (~98.2%). `run` replaces the stage spec by its directory. The
# pruned network and its compression are the LeNet-300-100's; only the soft targets change.
LENET5_TEACHER = {"teacher": DENSE_LENET5}


# Transformers (docs/transformers.md): the byte-level GPT on the Python standard library's
# sources, pruned without fine-tune by Net-Trim (cascade, kept-fraction mode) and the one-shot
# peers at the same per-layer counts, on the same 128 calibration windows (16,384 byte rows).
DENSE_GPT = ("train", {"model": "gpt", "dataset": "python_stdlib", "epochs": 4,
                       "batch_size": 64, "learning_rate": 3e-3, "train_examples": 20000})
_CALIBRATION_GPT = {"samples": 128, "heldout": 32}
GPT_METHODS = ("nettrim", "sparsegpt", "wanda", "magnitude")
GPT_KEPT = (0.5, 0.4, 0.3, 0.2)  # 50/60/70/80% sparsity
for _method in GPT_METHODS:
    _extra = {"scheme": "cascade"} if _method == "nettrim" else {"method": _method}
    for _kept in GPT_KEPT:
        CONFIGS[f"gpt_{_method}_{round(100 * (1 - _kept))}"] = [
            DENSE_GPT, ("nettrim", {"kept_fraction": _kept, **_extra, **_CALIBRATION_GPT})]
    CONFIGS[f"gpt_{_method}_2to4"] = [
        DENSE_GPT, ("nettrim", {"nm": (2, 4), **_extra, **_CALIBRATION_GPT})]
# Net-Trim whose kept weights are re-fit without ℓ1 (its kept-fraction polish: cut to the count
# in 2 rounds, the survivors re-fit on their support after each).
for _kept in GPT_KEPT:
    CONFIGS[f"gpt_nettrimpolish_{round(100 * (1 - _kept))}"] = [
        DENSE_GPT, ("nettrim", {"kept_fraction": _kept, "scheme": "cascade", "polish": 2,
                                **_CALIBRATION_GPT})]


# The ViT on MNIST, the same comparison: 1,000 calibration images (49,000 token rows).
DENSE_VIT = ("train", {"model": "vit", "epochs": 10, "learning_rate": 1e-3})
_CALIBRATION_VIT = {"samples": 1000, "heldout": 200}
for _method in ("nettrimpolish", "sparsegpt", "wanda", "magnitude"):
    _extra = {"scheme": "cascade", "polish": 2} if _method == "nettrimpolish" else {
        "method": _method}
    for _kept in (0.5, 0.3):
        CONFIGS[f"vit_{_method}_{round(100 * (1 - _kept))}"] = [
            DENSE_VIT, ("nettrim", {"kept_fraction": _kept, **_extra, **_CALIBRATION_VIT})]
CONFIGS["vit_nettrim_2to4"] = [DENSE_VIT, ("nettrim", {"nm": (2, 4), "scheme": "cascade",
                                                       **_CALIBRATION_VIT})]
CONFIGS["vit_sparsegpt_2to4"] = [DENSE_VIT, ("nettrim", {"nm": (2, 4), "method": "sparsegpt",
                                                         **_CALIBRATION_VIT})]
# Certified structured Net-Trim on the ViT (issue 26): half the input units of every layer —
# whole heads of each attention output projection, half the MLP's hidden units, half the
# features each q/k/v/MLP/classifier reads — then compaction (the compaction benchmark's ViT).
CONFIGS["vit_units_50"] = [DENSE_VIT, ("nettrim", {"units": True, "kept_fraction": 0.5,
                                                   "scheme": "cascade", **_CALIBRATION_VIT}),
                           ("compact", {})]
CONFIGS["vit_units_norm_50"] = [DENSE_VIT, ("prune", {"rule": "units", "value": 0.5}),
                                ("compact", {})]

# The same short fine-tune after each method (masked: pruned weights stay 0, plain cross-entropy):
# one epoch of the GPT's 20,000 training windows, two epochs of the ViT's MNIST.
_FINETUNE = {"gpt": ("finetune", {"epochs": 1, "learning_rate": 1e-3, "batch_size": 64,
                                  "train_examples": 20000}),
             "vit": ("finetune", {"epochs": 2, "learning_rate": 3e-4})}
for _model, _points in (("gpt", ("nettrimpolish_50", "nettrimpolish_70", "nettrim_2to4")),
                        ("vit", ("nettrimpolish_50", "nettrimpolish_70", "nettrim_2to4"))):
    for _point in _points:
        for _name in (_point, *(_point.replace(_point.split("_")[0], _method)
                                for _method in ("sparsegpt", "wanda", "magnitude"))):
            if f"{_model}_{_name}" in CONFIGS:
                CONFIGS[f"{_model}_{_name}_ft"] = CONFIGS[f"{_model}_{_name}"] + [
                    _FINETUNE[_model]]


def with_lenet5_teacher(stages: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The chain with every (distilled) fine-tune distilling from the dense LeNet-5."""
    return [(stage, {**settings, **LENET5_TEACHER} if stage == "finetune" else settings)
            for stage, settings in stages]


CONFIGS["hs_distill5_lenet300100"] = with_lenet5_teacher(CONFIGS["hs_distill_lenet300100"])
for _epsilon in (0.1, 0.2, 0.3):
    CONFIGS[f"hoyertrim5_lenet300100_eps{_epsilon:g}"] = with_lenet5_teacher(
        CONFIGS[f"hoyertrim_lenet300100_eps{_epsilon:g}"])
# The flagship in two steps of 15 distilled epochs (the schedule that moved Net-Trim's ≤ 5%
# frontier): HS → prune → Net-Trim → tune → Net-Trim on the survivors → tune.
for _epsilon in (0.1, 0.15):
    CONFIGS[f"hoyertrim_stepped_lenet300100_eps{_epsilon:g}"] = HS_PRUNED_LENET300100 + [
        ("nettrim", {"epsilon": _epsilon, "scheme": "cascade", "within_nonzeros": True}),
        ("finetune", {"epochs": 15, "learning_rate": 3e-4, "distill": True}),
        ("nettrim", {"epsilon": _epsilon, "scheme": "cascade", "within_nonzeros": True}),
        ("finetune", {"epochs": 15, "learning_rate": 3e-4, "distill": True})]
# The student stops fitting the LeNet-5 teacher's soft targets (98.9% training accuracy): a
# longer fine-tune at Adam's usual rate. And a gentler HS start (α = 5e-5, s = 0.15: 57.4x).
CONFIGS["hoyertrim5_long_lenet300100_eps0.2"] = CONFIGS["hoyertrim_lenet300100_eps0.2"][:4] + [
    ("finetune", {"epochs": 60, "learning_rate": 1e-3, "distill": True, **LENET5_TEACHER})]
CONFIGS["hoyertrim_gentle_lenet300100_eps0.15"] = [
    DENSE_LENET300100,
    ("regularize", {"penalty": "hoyer_square", "strength": 5e-5, "epochs": 100}),
    ("prune", {"rule": "std", "value": 0.15}),
    ("nettrim", {"epsilon": 0.15, "scheme": "cascade", "within_nonzeros": True}),
    ("finetune", {"epochs": 30, "learning_rate": 3e-4, "distill": True})]
# Net-Trim + 30 distilled epochs at ≤ 5%, with the LeNet-5 teacher.
CONFIGS["nettrim_thrice_ft5_lenet300100"] = with_lenet5_teacher(
    CONFIGS["nettrim_thrice_ft_lenet300100"])

# The flagship on LeNet-5: a longer, stronger HS run (α = 2e-4, 50 epochs), DeepHoyer's rule at
# s = 0.2, then either the distilled fine-tune alone or Net-Trim's re-fit of the survivors first.
CONFIGS["dense_lenet5"] = [DENSE_LENET5]
HS_PRUNED_LENET5 = [DENSE_LENET5,
                    ("regularize", {"penalty": "hoyer_square", "strength": 2e-4, "epochs": 50}),
                    ("prune", {"rule": "std", "value": 0.2})]
CONFIGS["hs_distill_lenet5"] = HS_PRUNED_LENET5 + [
    ("finetune", {"epochs": 20, "learning_rate": 3e-4, "distill": True})]
# 40 distilled epochs at Adam 1e-3: the longer, faster fine-tune that moved LeNet-300-100's
# ≥ 70x point and the structured LeNet-5 (1.79% → 1.42%).
CONFIGS["hs_distill_long_lenet5"] = HS_PRUNED_LENET5 + [
    ("finetune", {"epochs": 40, "learning_rate": 1e-3, "distill": True})]
for _epsilon in (0.05, 0.1):
    CONFIGS[f"hoyertrim_lenet5_eps{_epsilon:g}"] = HS_PRUNED_LENET5 + [
        ("nettrim", {"epsilon": _epsilon, "scheme": "cascade", "within_nonzeros": True}),
        ("finetune", {"epochs": 20, "learning_rate": 3e-4, "distill": True}),
        ("compact", {})]

# The peer at equal counts: Zhu & Gupta's gradual magnitude pruning from the dense LeNet-5 to
# exactly HS's per-layer counts (`like`: a chain, resolved to its last directory by `run`) over
# the HS run's 50 epochs, then the same fine-tune as HS alone.
CONFIGS["gradual_distill_lenet5"] = [
    DENSE_LENET5, ("gradual", {"like": HS_PRUNED_LENET5, "epochs": 50}),
    ("finetune", {"epochs": 20, "learning_rate": 3e-4, "distill": True})]
# ... and the one-shot layer-wise methods from the dense LeNet-5 to the same counts (cascade:
# each layer sees the pruned ones before it), then the same fine-tune: Net-Trim alone (with a
# polish round, which reaches the exact count), SparseGPT, magnitude.
for _name, _settings in (("nettrim", {"polish": 1}), ("sparsegpt", {"method": "sparsegpt"}),
                         ("magnitude", {"method": "magnitude"})):
    CONFIGS[f"{_name}_like_hs_distill_lenet5"] = [
        DENSE_LENET5, ("nettrim", {"like": HS_PRUNED_LENET5, "scheme": "cascade", **_settings}),
        ("finetune", {"epochs": 20, "learning_rate": 3e-4, "distill": True})]


def ghs_structured_lenet5(strength: float) -> list[tuple[str, dict]]:
    """The dense LeNet-5, Group-HS at ``strength`` for 40 epochs, DeepHoyer's rule (s = 0.1)."""
    return [DENSE_LENET5,
            ("regularize", {"penalty": "group_hoyer_square", "strength": strength,
                            "epochs": 40}),
            ("prune", {"rule": "std", "value": 0.1})]


# LeNet-5 structured (issue 10: ≥ 15x fewer forward FLOPs with dense kernels of the surviving
# units): Group-HS stronger and longer than `ghs_lenet5` (α = 1e-2 × 30 epochs left 7 and 13
# conv filters, 9.1x), the distilled fine-tune, compaction.
CONFIGS["ghs_structured_lenet5_a0.03"] = ghs_structured_lenet5(3e-2) + [
    ("finetune", {"epochs": 20, "learning_rate": 3e-4, "distill": True}), ("compact", {})]
# ... and fine-tuned longer at Adam's usual rate (the schedule that helped LeNet-300-100's
# smallest networks); α = 2e-2 between the two structures.
for _strength in (2e-2, 3e-2):
    CONFIGS[f"ghs_structured_long_lenet5_a{_strength:g}"] = ghs_structured_lenet5(_strength) + [
        ("finetune", {"epochs": 40, "learning_rate": 1e-3, "distill": True}), ("compact", {})]

# Per-layer strengths: Group-HS α = 3e-2 on the conv layers, whose filters cost the forward FLOPs,
# and the 1.03% point's 1e-2 on the Dense layers, whose units cost almost none.
def ghs_layers_long_lenet5(conv0: float, conv1: float, dense: float) -> list[tuple[str, dict]]:
    """Group-HS at per-layer strengths for 40 epochs, s = 0.1, 40 distilled epochs, compaction."""
    return [DENSE_LENET5,
            ("regularize", {"penalty": "group_hoyer_square", "epochs": 40, "strength": {
                "conv0": conv0, "conv1": conv1, "dense0": dense, "dense1": dense}}),
            ("prune", {"rule": "std", "value": 0.1}),
            ("finetune", {"epochs": 40, "learning_rate": 1e-3, "distill": True}), ("compact", {})]


CONFIGS["ghs_layers_long_lenet5"] = ghs_layers_long_lenet5(3e-2, 3e-2, 1e-2)
# The weaker Dense penalty let conv1 keep 10 filters (11.3x): twice the strength there.
CONFIGS["ghs_layers_long_lenet5_conv1x2"] = ghs_layers_long_lenet5(3e-2, 6e-2, 1e-2)


def seeded(stages: list[tuple[str, dict]], seed: int) -> list[tuple[str, dict]]:
    """The chain with ``seed`` in every stage after the shared dense one that takes a seed: the
    regularized run's data order, Net-Trim's calibration sample and the fine-tune's data order."""
    return stages[:1] + [(stage, {**settings, "seed": seed}
                          if stage in ("regularize", "gradual", "nettrim", "finetune")
                          else settings)
                         for stage, settings in stages[1:]]


# Headline points over three seeds (seed 0 is the plain name).
for _name in ("nettrim_thrice_ft5_lenet300100", "hoyertrim5_lenet300100_eps0.2",
              "hoyertrim5_long_lenet300100_eps0.2", "hoyertrim_lenet5_eps0.05",
              "hs_distill_lenet5", "ghs_structured_long_lenet5_a0.03"):
    for _seed in (1, 2):
        CONFIGS[f"{_name}_seed{_seed}"] = seeded(CONFIGS[_name], _seed)

# The transformers' headline points over three calibration samples (seed 0 is the plain name).
for _model, _names in (("gpt", ("nettrimpolish_50", "sparsegpt_50", "nettrim_2to4",
                                "sparsegpt_2to4")),
                       ("vit", ("nettrimpolish_50", "sparsegpt_50", "nettrimpolish_70",
                                "sparsegpt_70", "nettrim_2to4", "sparsegpt_2to4"))):
    for _name in _names:
        for _seed in (1, 2):
            CONFIGS[f"{_model}_{_name}_seed{_seed}"] = seeded(CONFIGS[f"{_model}_{_name}"], _seed)

# Whole units: certified structured Net-Trim (`--units`, cascade, unit-count mode) against
# group-norm pruning of the same number of input units in every layer; without and with the
# same short fine-tune; both compacted to a smaller dense model.
for _kept in (0.5, 0.3):
    _tag = round(100 * (1 - _kept))
    _units = {"nettrim": ("nettrim", {"units": True, "kept_fraction": _kept, "scheme": "cascade",
                                      "samples": 2000, "heldout": 500}),
              "norm": ("prune", {"rule": "units", "value": round(1 - _kept, 2)})}
    for _name, _stage in _units.items():
        CONFIGS[f"units_{_name}_lenet300100_{_tag}"] = [DENSE_LENET300100, _stage, ("compact", {})]
        CONFIGS[f"units_{_name}_ft_lenet300100_{_tag}"] = [
            DENSE_LENET300100, _stage, ("finetune", {"epochs": 5, "learning_rate": 3e-4}),
            ("compact", {})]

# Whole units over three calibration samples / fine-tune seeds (seed 0 is the plain name).
for _name in [n for n in CONFIGS if n.startswith("units_")]:
    for _seed in (1, 2):
        CONFIGS[f"{_name}_seed{_seed}"] = seeded(CONFIGS[_name], _seed)

# Net-Trim against the one-shot peers on LeNet-300-100 (docs/results_mnist.md): every layer at
# the same sparsity (or 2:4) from the same 5,000 calibration images, no fine-tune, then the same
# 3-epoch masked fine-tune. SparseGPT and Wanda run sequentially, as in their papers.
PEERS = {"nettrim_parallel": {"scheme": "parallel"}, "nettrim_cascade": {"scheme": "cascade"},
         "sparsegpt": {"method": "sparsegpt", "scheme": "cascade"},
         "wanda": {"method": "wanda", "scheme": "cascade"},
         "magnitude": {"method": "magnitude", "scheme": "parallel"}}
PEERS_FINETUNE = ("finetune", {"epochs": 3, "learning_rate": 1e-3})
for _method, _extra in PEERS.items():
    for _target in ({"kept_fraction": k} for k in (0.5, 0.3, 0.2, 0.1, 0.05)):
        _tag = round(100 * (1 - _target["kept_fraction"]))
        CONFIGS[f"peers_{_method}_lenet300100_{_tag}"] = [
            DENSE_LENET300100, ("nettrim", {**_target, **_extra}), PEERS_FINETUNE]
    CONFIGS[f"peers_{_method}_lenet300100_2to4"] = [
        DENSE_LENET300100, ("nettrim", {"nm": (2, 4), **_extra}), PEERS_FINETUNE]

# Net-Trim's ε sweep without fine-tune against magnitude pruning to the same per-layer counts
# (`like`), each then given the same 8-epoch masked fine-tune.
for _scheme in ("parallel", "cascade"):
    for _epsilon in (0.05, 0.1, 0.2, 0.3, 0.4):
        _pruned = [DENSE_LENET300100, ("nettrim", {"epsilon": _epsilon, "scheme": _scheme})]
        _finetune = ("finetune", {"epochs": 8, "learning_rate": 1e-3})
        CONFIGS[f"epsilon_{_scheme}_lenet300100_{_epsilon:g}"] = _pruned + [_finetune]
        CONFIGS[f"epsilon_magnitude_{_scheme}_lenet300100_{_epsilon:g}"] = [
            DENSE_LENET300100, ("nettrim", {"like": _pruned, "method": "magnitude",
                                            "scheme": "parallel"}), _finetune]

# ResNet-20 on Fashion-MNIST (issue 26, DeepHoyer's RQ4 at ResNet scale): the dense network
# (Adam, cosine, 10 epochs); Group-HS over every conv's filters and input channels plus one term
# over the residual stream's coupled groups (a channel in the stem, every block's second conv and
# the padded shortcuts, found from the computation), then DeepHoyer's rule on whole groups —
# coupled groups in every member at once — a short distilled fine-tune and compaction.
DENSE_RESNET20 = ("train", {"model": "resnet20", "model_kwargs": {"input_shape": [28, 28, 1]},
                            "dataset": "fashion_mnist", "epochs": 10})
CONFIGS["dense_resnet20"] = [DENSE_RESNET20]


def structured_resnet20(penalty: str, strength: float) -> list[tuple[str, dict]]:
    """Dense ResNet-20, ``penalty`` over every conv's groups for 2 epochs, whole groups below
    5% of their layer's largest norm removed, 1 distilled epoch, compaction (a 5-minute epoch on
    this 2-core CPU sets the budget)."""
    return [DENSE_RESNET20,
            ("regularize", {"penalty": penalty, "strength": strength, "epochs": 2}),
            ("prune", {"rule": "group", "value": 0.05}),
            ("finetune", {"epochs": 1, "learning_rate": 3e-4, "distill": True}),
            ("compact", {})]


CONFIGS["ghs_resnet20_a0.01"] = structured_resnet20("group_hoyer_square", 1e-2)
CONFIGS["ghs_resnet20_a0.03"] = structured_resnet20("group_hoyer_square", 3e-2)
# Magnitude of groups at the same FLOPs: the dense network's groups (per layer and coupled)
# below 0.7563 of their largest — the value whose structured FLOPs ratio on the dense network
# equals the Group-HS α 1e-2 chain's after its prune (1.74x; bisection on that ratio) — then the
# same distilled epoch and compaction.
CONFIGS["groups_magnitude_resnet20"] = [
    DENSE_RESNET20, ("prune", {"rule": "group", "value": 0.7563}),
    ("finetune", {"epochs": 1, "learning_rate": 3e-4, "distill": True}), ("compact", {})]
# Certified structured Net-Trim on the dense ResNet-20 (half the input channels of every conv,
# cascade, 1,000 calibration images) against group-norm pruning of the same channels; each
# without fine-tune and with one masked epoch; compacted.
_CALIBRATION_RESNET = {"samples": 1000, "heldout": 200}
for _name, _stage in (("nettrim", ("nettrim", {"units": True, "kept_fraction": 0.5,
                                               "scheme": "cascade", **_CALIBRATION_RESNET})),
                      ("norm", ("prune", {"rule": "units", "value": 0.5}))):
    CONFIGS[f"units_{_name}_resnet20_50"] = [DENSE_RESNET20, _stage, ("compact", {})]
    CONFIGS[f"units_{_name}_ft_resnet20_50"] = [
        DENSE_RESNET20, _stage, ("finetune", {"epochs": 1, "learning_rate": 3e-4}),
        ("compact", {})]
CONFIGS["glasso_resnet20_a0.0001"] = structured_resnet20("group_lasso", 1e-4)


# Models written the ordinary Flax way (examples/user_models.py), trained by the same stage,
# then Net-Trim ε = 0.1 without fine-tune.
for _name, _class in (("flax_cnn", "FlaxExampleCNN"), ("conv_bn", "ConvBatchNormCNN")):
    for _scheme in ("parallel", "cascade"):
        CONFIGS[f"user_{_name}_{_scheme}"] = [
            ("train", {"model": f"examples/user_models.py:{_class}", "epochs": 3}),
            ("nettrim", {"epsilon": 0.1, "scheme": _scheme})]

NETTRIM_FC_REFIT = ("nettrim", {"epsilon": 0.1, "scheme": "cascade", "refit": True})
for _name in ("plain", "l1", "hs"):
    CONFIGS[f"regnets_{_name}_refit"] = CONFIGS[f"regnets_{_name}"][:-1] + [NETTRIM_FC_REFIT]
# Magnitude pruning of the same network to exactly each Net-Trim run's per-layer counts.
for _name in ("plain", "dropout", "l1", "hs", "plain_refit", "l1_refit", "hs_refit"):
    _chain = CONFIGS[f"regnets_{_name}"]
    CONFIGS[f"regnets_{_name}_magnitude"] = _chain[:-1] + [
        ("nettrim", {"method": "magnitude", "like": _chain, "scheme": "cascade"})]

_STAGES = {"train": pipeline.train, "regularize": pipeline.regularize,
           "gradual": pipeline.gradual, "prune": pipeline.prune, "finetune": pipeline.finetune,
           "nettrim": pipeline.nettrim, "compact": pipeline.compact}


def run_stages(name: str, chain: list[tuple[str, dict]], *, root, data_dir, progress
               ) -> list[dict]:
    """Runs (or reuses) each stage of ``chain`` in turn; one record per stage. A ``teacher``
    given as a dense stage spec and a ``like`` given as a chain are first resolved to their
    directories."""
    parent, model, stages = None, None, []
    for stage, settings in chain:
        model = settings.get("model", model)
        if isinstance(settings.get("teacher"), tuple):  # a dense stage spec: its directory
            settings = dict(settings, teacher=str(common.dense_stage(
                settings["teacher"][1], root=root, data_dir=data_dir, progress=progress)))
        if isinstance(settings.get("like"), list):  # a chain: its last stage's directory
            settings = dict(settings, like=run_stages(
                name, settings["like"], root=root, data_dir=data_dir,
                progress=progress)[-1]["directory"])
        out = common.stage_directory(root, stage, model, parent, settings)
        kwargs = dict(pipeline.training_kwargs(stage, settings), data_dir=data_dir,
                      command=["python", "experiments/run.py", name])
        if stage in ("train", "regularize", "gradual", "finetune", "nettrim"):
            kwargs["progress"] = progress
        if stage == "train":
            result = pipeline.train(kwargs.pop("model"), out, **kwargs)
        else:
            result = _STAGES[stage](parent, out, **kwargs)
        print(f"{name}: {stage} {'reused' if result.reused else 'wrote'} {result.directory}",
              flush=True)
        stages.append({"stage": stage, "settings": settings, "directory": str(result.directory),
                       "results": {k: v for k, v in result.results.items() if k != "sparsity"}})
        parent = result.directory
    return stages


def _dense_evaluation(directory, data_dir) -> dict:
    written = pathlib.Path(directory) / "evaluation-test.json"
    if written.is_file():
        return json.loads(written.read_text())
    return pipeline.evaluate(directory, data_dir=data_dir)


def run(name: str, *, root="runs/pipeline", data_dir=None, progress=True,
        results_dir="results/pipelines") -> dict:
    """Runs pipeline ``name`` (a key of `CONFIGS`) and writes its results file."""
    started = time.perf_counter()
    stages = run_stages(name, CONFIGS[name], root=root, data_dir=data_dir, progress=progress)
    # The test set, once per reported point: the dense reference, a regularized network and
    # every pruned one (a compact stage computes its parent's function, checked when written).
    # The shared dense stage's evaluation is reused once written (a stage never changes).
    evaluated = [_dense_evaluation(stage["directory"], data_dir) if index == 0
                 else pipeline.evaluate(stage["directory"], data_dir=data_dir)
                 for index, stage in enumerate(stages)
                 if index == 0 or stage["stage"] in ("regularize", "prune", "gradual", "nettrim",
                                                     "oneshot", "finetune")]
    payload = {"name": name, "command": f"python experiments/run.py {name}",
               "stages": stages, "test": evaluated,
               "seconds_this_run": time.perf_counter() - started}
    path = pathlib.Path(results_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    final = evaluated[-1]
    print(f"{name}: test accuracy {100 * final['accuracy']:.2f}% (dense "
          f"{100 * final.get('reference_accuracy', final['accuracy']):.2f}%); wrote {path}")
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("names", nargs="*", help="pipelines to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the pipelines and exit")
    parser.add_argument("--root", default="runs/pipeline", help="where stage directories go")
    parser.add_argument("--data-dir", default=None, help="data root holding mnist/")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in CONFIGS]
    if args.list or not args.names or unknown:
        if unknown:
            print(f"unknown pipeline(s): {', '.join(unknown)}")
        for name, stages in CONFIGS.items():
            print(f"{name}: " + " → ".join(
                f"{stage}({', '.join(f'{k}={v}' for k, v in settings.items())})"
                for stage, settings in stages))
        return 2 if unknown else 0
    for name in args.names:
        run(name, root=args.root, data_dir=args.data_dir, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
