"""The ``hoyertrim`` command: the pipeline stages (`hoyertrim.pipeline`) over stage directories.

    hoyertrim quickstart                       # dense LeNet-300-100 → Net-Trim → compact → report
    hoyertrim train --model my_pkg.nets:MyNet --epochs 10
    hoyertrim nettrim runs/train-… --epsilon 0.1 --scheme cascade
    hoyertrim compact runs/nettrim-…
    hoyertrim evaluate runs/compact-…
    hoyertrim report runs/train-… runs/nettrim-… runs/compact-…

Every stage prints the directory it wrote; without ``--out`` that is
``runs/<stage>-<model>-<hash of the stage's settings and parent>``, so asking again with the same
settings reuses the finished stage and other settings get another directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import signal
import sys
import warnings

_DESCRIPTION = """\
Prune a trained JAX/Flax network: DeepHoyer sparsity training, Net-Trim certified pruning,
one-shot peers, compaction into a smaller dense model. Each command writes one stage folder.

  hoyertrim quickstart                     train, Net-Trim, compact, evaluate, report
  hoyertrim train --model my_pkg.nets:MyNet
  hoyertrim nettrim runs/train-… --epsilon 0.1
  hoyertrim compact runs/nettrim-…
  hoyertrim evaluate runs/compact-…

The same command with the same settings reuses its finished folder; an interrupted one resumes.
'hoyertrim COMMAND --help' lists a command's options."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where the help already says what it is (None) or it
    is an off switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS and "%(default)" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 64}}', got "
                                         f"{text}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _kept_fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _existing_dir(text: str) -> str:
    if not pathlib.Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def _strength(text: str) -> float | dict:
    """A number, or a JSON object of positive numbers by layer."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise argparse.ArgumentTypeError(
                f"expected a number or a JSON object like '{{\"conv0\": 3e-2}}', got {text}")
    if not all(v > 0 for v in (value.values() if isinstance(value, dict) else [value])):
        raise argparse.ArgumentTypeError(f"strengths must be > 0, got {text}")
    return value


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M like 2:4, got {text}") from None
    if not 0 < n <= m:
        raise argparse.ArgumentTypeError(f"N:M needs 0 < N ≤ M, got {text}")
    return n, m


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _common(parser, *, out=True):
    if out:
        parser.add_argument("--out", default=None,
                            help="stage directory to write (default: runs/<stage>-<model>-<hash "
                                 "of the settings>)")
    parser.add_argument("--data-dir", type=_existing_dir, default=None,
                        help="folder holding mnist/ etc. (default: $HOYERTRIM_DATA, then the cache "
                             "~/.cache/hoyertrim, then a checksum-verified download)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _training_args(parser, defaults) -> None:
    """One flag per field of `pipeline.Training` (declared there, with its help and bounds),
    defaulting to the stage's ``defaults``."""
    group = parser.add_argument_group("training")
    for field in dataclasses.fields(defaults):
        meta = field.metadata
        number = field.type.split("|")[0].strip()
        if number == "bool":
            group.add_argument(f"--{field.name.replace('_', '-')}", action="store_true",
                               default=getattr(defaults, field.name), help=meta["help"])
            continue
        kind = {"int": _integer, "float": _number}.get(number)
        if meta.get("minimum") == 1:
            kind = _positive_int
        elif meta.get("positive"):
            kind = _positive_float
        elif meta.get("minimum") == 0:
            kind = _nonnegative_float if number == "float" else _nonnegative_int
        group.add_argument(f"--{field.name.replace('_', '-')}", type=kind,
                           choices=meta.get("choices"), default=getattr(defaults, field.name),
                           help=meta["help"])


def _training(args):
    """The `pipeline.Training` the flags of `_training_args` give."""
    from hoyertrim.pipeline import Training
    return Training(**{field.name: getattr(args, field.name)
                       for field in dataclasses.fields(Training)})


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("hoyertrim")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    from hoyertrim.data import DATASETS
    from hoyertrim.models import MODELS
    from hoyertrim.pipeline import PRUNE_RULES, TRAINING_DEFAULTS
    from hoyertrim.pruners import PRUNERS, pruner_names
    from hoyertrim.transforms import REGULARIZERS

    parser = argparse.ArgumentParser(prog="hoyertrim", description=_DESCRIPTION,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"hoyertrim {_version()}")
    cluster = parser.add_argument_group(
        "several processes", "run one command as several processes (hosts) joined by "
        "jax.distributed: each computes on its share of the data, process 0 writes")
    cluster.add_argument("--distributed", action="store_true",
                         help="join the cluster JAX detects (SLURM, a TPU pod, ...)")
    cluster.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                         help="process 0's address (with --num-processes and --process-id)")
    cluster.add_argument("--num-processes", type=_positive_int, default=None,
                         help="how many processes join")
    cluster.add_argument("--process-id", type=_nonnegative_int, default=None,
                         help="this process's index, 0 … N−1")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show its full traceback; show the warnings and logs "
                             "of the libraries underneath (hidden by default)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, description=help_text,
                                   formatter_class=_Formatter)

    p = command("quickstart", "train (or reuse) a dense model, Net-Trim it, compact it, evaluate "
                              "it on the test set and write a report")
    p.add_argument("--model", default="lenet300100",
                   help=f"zoo model ({', '.join(MODELS)}) or package.module:Class / file.py:Class")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help="JSON keyword arguments for the model")
    p.add_argument("--epochs", type=_positive_int, default=30, help="dense training epochs")
    p.add_argument("--epsilon", type=_fraction, default=0.1, help="Net-Trim's ε")
    p.add_argument("--scheme", choices=["parallel", "cascade"], default="cascade",
                   help="Net-Trim scheme")
    p.add_argument("--samples", type=_positive_int, default=5000,
                   help="training images that define Net-Trim's problems")
    p.add_argument("--workdir", default="runs/quickstart",
                   help="folder for the stage directories and the report")
    _common(p, out=False)

    p = command("train", "train a dense model from scratch (best validation epoch kept)")
    p.add_argument("--model", default="lenet300100",
                   help=f"zoo model ({', '.join(MODELS)}) or package.module:Class / file.py:Class")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help="JSON keyword arguments for the model, e.g. '{\"dropout_rate\": 0.3}'")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="dataset")
    _training_args(p, TRAINING_DEFAULTS["train"])
    _common(p)

    p = command("import", "make weights trained elsewhere (orbax checkpoint directory, flax "
                          ".msgpack, or .npz) the first stage of a chain, checked against the "
                          "model")
    p.add_argument("checkpoint", help="the weights: params, the variables dict or a train state")
    p.add_argument("--model", required=True,
                   help="zoo name or package.module:Class / file.py:Class the weights belong to")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help="JSON keyword arguments for the model")
    p.add_argument("--dataset", choices=DATASETS, default="mnist",
                   help="the data it was trained on (for calibration and evaluation)")
    _common(p)

    p = command("regularize", "train from a stage's weights with a DeepHoyer (or other) sparsity "
                              "penalty; the last epoch is kept")
    p.add_argument("parent", help="stage directory to start from")
    p.add_argument("--penalty", choices=sorted(REGULARIZERS), default="hoyer_square",
                   help="penalty added to the loss")
    p.add_argument("--strength", type=_strength, default=1e-4,
                   help="penalty strength α, or a JSON object of per-layer strengths like "
                        "'{\"conv0\": 3e-2, \"dense0\": 1e-2}' (layers not named are not "
                        "regularized)")
    _training_args(p, TRAINING_DEFAULTS["regularize"])
    _common(p)

    p = command("gradual", "gradual magnitude pruning (Zhu & Gupta) while training from a "
                           "stage's weights; the last epoch is kept")
    p.add_argument("parent", help="stage directory to start from (e.g. the dense model)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=_fraction, default=None,
                        help="removed fraction of every kernel at the end")
    target.add_argument("--like", default=None,
                        help="stage directory of the same model whose per-layer counts of "
                             "nonzero weights to reach (e.g. a DeepHoyer-pruned stage)")
    p.add_argument("--end-fraction", type=_kept_fraction, default=0.75,
                   help="fraction of the training steps over which the sparsity rises; the rest "
                        "trains with the final masks")
    _training_args(p, TRAINING_DEFAULTS["gradual"])
    _common(p)

    p = command("prune", "prune a stage's weights by a rule (no training)")
    p.add_argument("parent", help="stage directory to prune")
    p.add_argument("--rule", choices=PRUNE_RULES, default="std",
                   help="threshold: |w| < value; std: |w| < value·std(w) per tensor; "
                        "magnitude / global_magnitude: to sparsity value per layer / overall; "
                        "group: units with norm < value·max norm; group_std: units with norm < "
                        "value·std of the norms; units: the fraction value of each layer's input "
                        "units with the smallest norms")
    p.add_argument("--value", type=_nonnegative_float, default=0.1,
                   help="the rule's threshold or sparsity")
    _common(p)

    p = command("finetune", "masked fine-tune (pruned weights stay 0); best validation epoch "
                            "kept")
    p.add_argument("parent", help="pruned stage directory")
    p.add_argument("--distill", action="store_true",
                   help="distill from a teacher (T=4, half weight on the labels)")
    p.add_argument("--teacher", default=None,
                   help="teacher stage directory for --distill (default: the chain's first "
                        "stage, usually the dense model)")
    _training_args(p, TRAINING_DEFAULTS["finetune"])
    _common(p)

    for name, help_text in (
            ("nettrim", "Net-Trim: certified layer-wise convex pruning, no retraining"),
            ("oneshot", "one-shot layer-wise peers (SparseGPT, Wanda, magnitude) on the same "
                        "calibration images, with the same checked per-layer report")):
        p = command(name, help_text)
        p.add_argument("parent", help="trained stage directory")
        if name == "oneshot":
            p.add_argument("--method", choices=pruner_names(one_shot=True),
                           default="sparsegpt", help="which peer: " + "; ".join(
                               PRUNERS[name].description for name in pruner_names(one_shot=True)))
        target = p.add_mutually_exclusive_group(required=name == "oneshot")
        if name == "nettrim":
            target.add_argument("--epsilon", type=_fraction, default=0.1,
                                help="relative discrepancy ε per layer (the cascade's first "
                                     "layer; later ones get √γ × what the pruned layers "
                                     "before leave)")
        target.add_argument("--kept-fraction", type=_kept_fraction, default=None,
                            help="fraction of each layer's weights to keep"
                                 + (", instead of ε" if name == "nettrim" else ""))
        target.add_argument("--nm", type=_nm, default=None,
                            help="N:M pattern, e.g. 2:4 (layers whose input count is a "
                                 "multiple of M)")
        target.add_argument("--like", default=None,
                            help="stage directory of the same model whose per-layer counts of "
                                 "nonzero weights to keep (e.g. a DeepHoyer-pruned stage)")
        p.add_argument("--scheme", choices=["parallel", "cascade"], default="cascade",
                       help="parallel: layers independent; cascade: each sees the pruned ones "
                            "before it")
        p.add_argument("--within-nonzeros", action="store_true",
                       help="keep the parent's zeros: re-fit each layer on its nonzeros only")
        p.add_argument("--samples", type=_positive_int, default=5000,
                       help="training examples that define the problems (a random subset, "
                            "drawn with --seed)")
        p.add_argument("--heldout", type=_nonnegative_int, default=1000,
                       help="validation examples the discrepancies are measured on (a random "
                            "subset; 0: none)")
        if name == "nettrim":
            p.add_argument("--maxiter", type=_positive_int, default=300,
                           help="FISTA iterations per solve")
            p.add_argument("--refit", action="store_true",
                           help="debias the kept weights after the λ search (same support, "
                                "lower discrepancy)")
            p.add_argument("--polish", type=int, default=0, metavar="ROUNDS",
                           help="rounds of debias-then-threshold after each layer's λ search: "
                                "with --epsilon fewer weights at the same ε, with "
                                "--kept-fraction the exact count at a lower discrepancy (~50 "
                                "extra iterations a round)")
            p.add_argument("--units", action="store_true",
                           help="prune whole input units of each layer (the rows that read one "
                                "unit of the layer before) so that compact removes them: "
                                "--epsilon for the fewest units within ε, --kept-fraction for "
                                "that fraction of the units")
        p.add_argument("--seed", type=int, default=0,
                       help="seeds the calibration and held-out subsets and the row subsets of "
                            "large layers")
        _common(p)

    p = command("compact", "remove dead units and store the smaller arrays compressed")
    p.add_argument("parent", help="pruned stage directory")
    _common(p)

    p = command("evaluate", "accuracy, agreement with a reference, per-layer sparsity and FLOPs, "
                            "bytes on disk (written to <dir>/evaluation-<split>.json; against another "
                            "--reference: evaluation-<split>-vs-<hash>.json)")
    p.add_argument("directory", help="stage directory")
    p.add_argument("--reference", default=None,
                   help="stage directory to compare with (default: the chain's first stage)")
    p.add_argument("--split", choices=["validation", "test", "train"], default="test",
                   help="which split")
    _common(p, out=False)

    p = command("verify", "check that the files a stage and the stages before it wrote are "
                          "unchanged (the checksums in their manifests)")
    p.add_argument("directory", help="stage directory (its parents are checked too)")

    p = command("report", "Markdown + PNG report of stage directories (a chain or a sweep)")
    p.add_argument("directories", nargs="+", help="stage directories, in the order to show")
    p.add_argument("--out", default=None,
                   help="report folder (default: runs/report-<hash of the directories>)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a report.md that lists more stages than this one")
    return parser


def _default_out(args, stage: str, model: str) -> str:
    from hoyertrim.pipeline import default_directory
    settings = {k: v for k, v in sorted(vars(args).items())
                if k not in ("out", "no_progress", "data_dir", "command")}
    for key in ("parent", "teacher", "reference", "checkpoint", "like"):
        if settings.get(key):
            settings[key] = str(pathlib.Path(settings[key]).expanduser().absolute())
    return str(default_directory(stage, model, settings))


def _model_name(parent) -> str:
    from hoyertrim.pipeline import read_manifest
    return read_manifest(parent)["model"]["spec"]


def _headline(result) -> str:
    r = result.results
    parts = []
    if "val_accuracy" in r:
        parts.append(f"validation accuracy {100 * r['val_accuracy']:.2f}%")
    if "kept_fraction" in r:
        parts.append(f"kept {100 * r['kept_fraction']:.2f}% of the weights "
                     f"({r['compression']:.1f}x), alive units {r['architecture']}")
    if "heldout" in r and r["heldout"]:
        parts.append(f"held-out top-1 agreement {100 * r['heldout']['top1_agreement']:.1f}%")
    if "bytes_on_disk" in r:
        parts.append(f"{r['bytes_on_disk']:,} bytes on disk (parent {r['parent_bytes_on_disk']:,})"
                     f", {r['weights_stored']:,} kernel entries stored, logits within "
                     f"{r['max_logit_difference']:.1e} of the parent's")
    verb = "reused" if result.reused else "wrote"
    return f"{verb} {result.directory}\n  " + "; ".join(parts)


def _verify_chain(directory) -> int:
    from hoyertrim import pipeline
    current = directory
    while current is not None:
        manifest = pipeline.read_manifest(current)
        count = pipeline.verify(current, manifest)
        print(f"{current}: {manifest['stage']}, "
              + (f"{count} files unchanged" if count else "no checksums recorded (written "
                 "before hoyertrim recorded them)"))
        current = pipeline.checked_link(current, manifest, "parent")
    return 0


def _run(args, command_line) -> int:
    from hoyertrim import pipeline, report
    progress = not getattr(args, "no_progress", False)
    common = dict(data_dir=getattr(args, "data_dir", None), command=command_line)
    if args.command == "quickstart":
        return _quickstart(args, command_line)
    if args.command in ("evaluate",):
        result = pipeline.evaluate(args.directory, reference=args.reference, split=args.split,
                                   data_dir=args.data_dir)
        print(_evaluation_text(result))
        return 0
    if args.command == "verify":
        return _verify_chain(args.directory)
    if args.command == "report":
        out = args.out or _default_out(argparse.Namespace(directories=[
            str(pathlib.Path(d).absolute()) for d in args.directories]), "report", "stages")
        written = report.write_report(args.directories, out, force=args.force)
        print(f"wrote {written}")
        return 0
    model = args.model if args.command in ("train", "import") else _model_name(args.parent)
    out = args.out or _default_out(args, args.command, model)
    if args.command == "import":
        result = pipeline.adopt(args.checkpoint, args.model, out, model_kwargs=args.model_kwargs,
                                dataset=args.dataset, **common)
    elif args.command == "train":
        result = pipeline.train(args.model, out, model_kwargs=args.model_kwargs,
                                dataset=args.dataset, training=_training(args),
                                progress=progress, **common)
    elif args.command == "regularize":
        result = pipeline.regularize(args.parent, out, penalty=args.penalty,
                                     strength=args.strength, training=_training(args),
                                     progress=progress, **common)
    elif args.command == "gradual":
        result = pipeline.gradual(args.parent, out, sparsity=args.sparsity, like=args.like,
                                  end_fraction=args.end_fraction, training=_training(args),
                                  progress=progress, **common)
    elif args.command == "prune":
        result = pipeline.prune(args.parent, out, rule=args.rule, value=args.value, **common)
    elif args.command == "finetune":
        result = pipeline.finetune(args.parent, out, distill=args.distill, teacher=args.teacher,
                                   training=_training(args), progress=progress, **common)
    elif args.command in ("nettrim", "oneshot"):
        explicit = any(v is not None for v in (args.kept_fraction, args.nm, args.like))
        result = pipeline.nettrim(
            args.parent, out, epsilon=None if explicit else getattr(args, "epsilon", None),
            kept_fraction=args.kept_fraction, nm=args.nm, like=args.like,
            method=getattr(args, "method", "nettrim"), scheme=args.scheme,
            within_nonzeros=args.within_nonzeros, refit=getattr(args, "refit", False),
            polish=getattr(args, "polish", 0), units=getattr(args, "units", False),
            samples=args.samples, heldout=args.heldout, maxiter=getattr(args, "maxiter", 300),
            seed=args.seed, progress=progress, **common)
    else:
        result = pipeline.compact(args.parent, out, **common)
    print(_headline(result))
    return 0


def _evaluation_text(result: dict) -> str:
    if "perplexity" in result:  # a language model: per next byte
        lines = [f"{result['directory']} ({result['stage']}): {result['split']} perplexity "
                 f"{result['perplexity']:.3f} ({result['bits_per_byte']:.3f} bits per byte), "
                 f"next-byte accuracy {100 * result['accuracy']:.2f}% on "
                 f"{result['positions']:,} bytes"]
    else:
        lines = [f"{result['directory']} ({result['stage']}): {result['split']} accuracy "
                 f"{100 * result['accuracy']:.2f}% on {result['examples']:,} images"]
    if "top1_agreement" in result:
        lines.append(f"  vs {result['reference']} ({100 * result['reference_accuracy']:.2f}%): "
                     f"top-1 agreement {100 * result['top1_agreement']:.2f}%, logits relative error "
                     f"{result['logits_relative_error']:.4f}")
    if "sparsity" in result:
        s = result["sparsity"]
        lines.append(f"  kept {s['kept_weights']:,} / {s['weights']:,} weights "
                     f"({100 * s['kept_fraction']:.2f}%, {s['compression']:.1f}x), alive units "
                     f"{s['architecture']}, forward FLOPs dense {s['dense_flops']:,} / sparse "
                     f"{s['sparse_flops']:,} / structured {s['structured_flops']:,}")
        for layer in s["layers"]:
            lines.append(f"    {layer['name']}: {100 * layer['kept_fraction']:.2f}% kept, "
                         f"inputs {layer['inputs_alive']}/{layer['inputs']}, outputs "
                         f"{layer['outputs_alive']}/{layer['outputs']}")
    else:
        lines.append(f"  compact: {result['weights_stored']:,} kernel entries stored")
    lines.append(f"  {result['bytes_on_disk']:,} bytes on disk; "
                 + (f"written to {result['file']}" if result.get("file") else
                    f"not saved ({result['not_saved']})"))
    return "\n".join(lines)


def _quickstart(args, command_line) -> int:
    from hoyertrim import pipeline
    try:
        return _quickstart_stages(args, command_line)
    except pipeline.StageConflict as conflict:
        raise pipeline.StageError(
            f"{args.workdir} holds a quick start made with other settings (its "
            f"{conflict.directory.name}: {'; '.join(conflict.differences[:2])}); choose another "
            "--workdir or delete it.") from conflict


def _quickstart_stages(args, command_line) -> int:
    from hoyertrim import pipeline, report
    workdir = pathlib.Path(args.workdir)
    progress = not args.no_progress
    common = dict(data_dir=args.data_dir, command=command_line)
    print(f"1/5 dense {args.model} ({args.epochs} epochs; reused if already trained)", flush=True)
    dense = pipeline.train(args.model, workdir / "dense", model_kwargs=args.model_kwargs,
                           training=pipeline.Training(epochs=args.epochs), progress=progress,
                           **common)
    print(_headline(dense), flush=True)
    print(f"2/5 Net-Trim {args.scheme}, ε = {args.epsilon:g}, {args.samples:,} training images",
          flush=True)
    trimmed = pipeline.nettrim(dense.directory, workdir / f"nettrim-{args.scheme}-{args.epsilon:g}",
                               epsilon=args.epsilon, scheme=args.scheme, samples=args.samples,
                               progress=progress, **common)
    print(_headline(trimmed), flush=True)
    print("3/5 compact", flush=True)
    small = pipeline.compact(trimmed.directory, workdir / f"compact-{args.scheme}-{args.epsilon:g}",
                             **common)
    print(_headline(small), flush=True)
    print("4/5 test set (once per model)", flush=True)
    for directory in (dense.directory, trimmed.directory, small.directory):
        print(_evaluation_text(pipeline.evaluate(directory, data_dir=args.data_dir)), flush=True)
    print("5/5 report", flush=True)
    written = report.write_report([dense.directory, trimmed.directory, small.directory],
                                  workdir / "report", force=True)
    print(f"wrote {written}")
    return 0


def _quiet_dependencies() -> None:
    """Hides the warnings and logs of the libraries underneath (JAXopt's deprecation, orbax's
    checkpoint logs, and the tracebacks orbax logs when an interrupt stops a save): a user sees
    hoyertrim's own lines, which carry every error; ``--debug`` shows them."""
    import logging
    warnings.simplefilter("ignore")
    for name in ("absl", "jax", "orbax", "jaxopt"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:
        pass


def _join_processes(parser, args) -> None:
    """`jax.distributed.initialize` as the cluster options ask (nothing without them)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if all(value is None for value in explicit) and not args.distributed:
        return
    if args.distributed and any(value is not None for value in explicit):
        parser.error("give --distributed or --coordinator/--num-processes/--process-id, not both")
    if not args.distributed and any(value is None for value in explicit):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if not args.distributed and args.process_id >= args.num_processes:
        parser.error(f"--process-id must be < --num-processes ({args.num_processes})")
    from hoyertrim.distributed import initialize
    initialize(*explicit)


def _interrupted(args, interrupt: KeyboardInterrupt, terminated: bool) -> str:
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    command = getattr(args, "command", None)
    resumable = getattr(interrupt, "resumable", None)  # a `pipeline.StageInterrupted`
    if command == "quickstart":
        what = "run the same command again to resume (finished stages are reused)"
    elif resumable is None:
        what = "nothing was written"
    elif resumable:
        what = (f"what was finished is kept in {interrupt.directory}; run the same command again "
                "to resume")
    else:
        what = "nothing was kept; run the same command again to start over"
    return f"hoyertrim{' ' + command if command else ''}: {how}; {what}."


def main(argv=None) -> int:
    """Entry point of the ``hoyertrim`` console script; returns the exit status."""
    terminated, pending = [], []

    def on_sigterm(signum, frame):
        # SIGTERM (kill, timeout, a scheduler's pre-emption) ends the run like Ctrl-C: the
        # stage's clean-up runs (a folder with nothing to resume is removed).
        terminated.append(signum)
        raise KeyboardInterrupt

    def later(signum, frame):
        pending.append(signum)

    try:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        # While the libraries load, a signal is only noted: raised inside the import of a
        # compiled extension (jaxlib builds enums from C++) it would abort the process.
        signal.signal(signal.SIGINT, later)
        signal.signal(signal.SIGTERM, later)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    args = None
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not args.debug:
                _quiet_dependencies()
            import hoyertrim.pipeline  # noqa: F401  (the rest of what a command loads)
            import hoyertrim.nettrim  # noqa: F401
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, on_sigterm)
        if pending:
            terminated += [s for s in pending if s == signal.SIGTERM]
            raise KeyboardInterrupt
        _join_processes(parser, args)
        from hoyertrim.distributed import is_writer
        with contextlib.redirect_stdout(sys.stdout if is_writer() else io.StringIO()):
            return _checked_run(args, ["hoyertrim", *(sys.argv[1:] if argv is None else argv)])
    except KeyboardInterrupt as interrupt:
        print(_interrupted(args, interrupt, bool(terminated)), file=sys.stderr)
        code = 143 if terminated else 130
        if argv is None:
            # The command's own process, its stage already cleaned up: leave without the
            # interpreter's teardown, in which XLA's threads can crash after an interrupt
            # (a segfault after the message above).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        if previous is not None:
            for number, handler in previous.items():
                signal.signal(number, handler)


def _checked_run(args, command_line) -> int:
    """`_run`, the library's errors for a user to act on printed as one line (``--debug``:
    raised, with their traceback)."""
    from hoyertrim.data import ChecksumError, DatasetNotFoundError
    from hoyertrim.nettrim import CertificateError
    from hoyertrim.pipeline import StageError
    from hoyertrim.train import TrainingDivergedError
    try:
        return _run(args, command_line)
    except (StageError, DatasetNotFoundError, ChecksumError, TrainingDivergedError,
            CertificateError, FileNotFoundError, OSError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(f"hoyertrim {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
