"""The pruning pipeline as stages over directories: what the ``hoyertrim`` command and the
experiments call.

Each stage reads the directory of the stage before it (none for `train`) and writes a new one:

    hoyertrim.json  the manifest: stage, model (zoo name or ``module:Class`` / ``file.py:Class``
                    and its keyword arguments), dataset, the stage's full config, the parent
                    directory, provenance (command, package versions, time), status, results
    network/        params, masks (True = kept) and the other collections (orbax), for every
                    stage but `compact`
    checkpoints/    the resumable run of a training stage (`checkpoint.Checkpointer`)
    compact/        the compact model (`compact.save_compact`)

A directory is keyed by its manifest's (stage, model, dataset, parent, config): asking for a
finished stage with the same key reuses it, with another key is refused (`StageError`), so a
changed setting never silently reuses a stale result. A stage that fails leaves no directory
behind unless it holds resumable checkpoints.

Stages record validation accuracy; the test set is evaluated by `evaluate`, once per point.

Modules: `errors`, `directory` (manifests, keyed reuse, checksums), `modelspec` (which
model), `network` (a stage's network: save, load, summary), `training`
(train, adopt, regularize, gradual, finetune), `pruning` (prune, nettrim / one-shot peers), `export`
(compact, evaluate).
"""

from hoyertrim.pipeline.directory import FORMAT, LOCK, MANIFEST, StageResult, checked_link, \
    checksums, default_directory, digest, directory_bytes, linked, read_manifest, verify
from hoyertrim.pipeline.errors import StageConflict, StageError, StageInterrupted
from hoyertrim.pipeline.export import compact, evaluate
from hoyertrim.pipeline.modelspec import model_of, model_spec, resolve_model
from hoyertrim.pipeline.network import load, load_data
from hoyertrim.pipeline.pruning import ONESHOT_METHODS, PRUNE_RULES, nettrim, prune, prune_masks
from hoyertrim.pipeline.training import TRAINING_DEFAULTS, Training, adopt, finetune, gradual, \
    regularize, train, training_kwargs

__all__ = ["FORMAT", "LOCK", "MANIFEST", "ONESHOT_METHODS", "PRUNE_RULES", "StageError",
           "StageConflict", "StageInterrupted", "StageResult", "checked_link", "digest",
           "adopt", "compact", "default_directory", "directory_bytes", "evaluate", "finetune",
           "gradual", "load", "load_data", "model_of", "model_spec", "nettrim", "prune",
           "prune_masks", "read_manifest", "regularize", "resolve_model", "train", "verify",
           "checksums", "linked", "TRAINING_DEFAULTS", "Training", "training_kwargs"]
