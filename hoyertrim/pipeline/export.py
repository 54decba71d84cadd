"""The compact stage and the evaluation of any stage on the test (or another) split."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib

import numpy as np

from hoyertrim import compact as compact_lib
from hoyertrim.checkpoint import predict_in_batches
from hoyertrim.pipeline.directory import (
    Stage, StageResult, checked_link, directory_bytes, new_manifest, read_manifest, stage_result)
from hoyertrim.pipeline.errors import StageError
from hoyertrim.pipeline.network import load, load_data, read_parent, stage_sparsity
from hoyertrim.train import mode_kwargs


def compact(parent, out, *, data_dir=None, command=None) -> StageResult:
    """Removes dead units (`compact.compact`) and stores the smaller arrays compressed; checks
    that the compact model's logits equal the parent's on the validation images."""
    parent_manifest, model, loaded = read_parent(parent)
    manifest = new_manifest("compact", {}, parent=parent_manifest, parent_dir=parent,
                         command=command)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir)
        variables = {"params": loaded.params, **loaded.model_state}
        kwargs = mode_kwargs(model, False)
        compacted = compact_lib.compact(model, variables, data.validation.images[:256],
                                        apply_kwargs=kwargs)
        compact_lib.save_compact(stage.out / "compact", compacted)
        reloaded = compact_lib.load_compact(stage.out / "compact", model)
        original = loaded.predict(data.validation.images, model=model)  # jitted, batched
        smaller = predict_in_batches(reloaded.apply, data.validation.images)
        scale = float(np.max(np.abs(original)))
        difference = float(np.max(np.abs(original - smaller)))
        if not difference <= 1e-4 * max(scale, 1.0):
            raise StageError(f"The compact model's logits differ from the pruned model's by "
                             f"{difference:.3g} (largest logit {scale:.3g}); not written. "
                             "Please report this with the model.")
        stage.finish({
            "weights_stored": compacted.weights(),
            "weights_nonzero": int(sum(np.count_nonzero(layer.kernel)
                                       for layer in compacted.layers.values())),
            "layers": {name: {"kernel_shape": list(np.shape(layer.kernel)),
                              "inputs_read": None if layer.input_index is None
                              else int(np.size(layer.input_index)),
                              "outputs_kept": layer.width if layer.output_index is None
                              else int(np.size(layer.output_index)),
                              "outputs": layer.width,
                              **({} if layer.heads is None
                                 else {"heads_kept": int(np.size(layer.heads))})}
                       for name, layer in compacted.layers.items()},
            "bytes_on_disk": directory_bytes(stage.out / "compact"),
            "parent_bytes_on_disk": directory_bytes(pathlib.Path(parent).expanduser().absolute()
                                                    / "network"),
            "max_logit_difference": difference,
            "val_accuracy": float(np.mean(np.argmax(smaller, -1) == data.validation.labels))})
    return stage_result(stage)


def evaluate(directory, *, reference=None, split: str = "test", data_dir=None) -> dict:
    """Accuracy of a stage on a split; with a reference stage (default: the chain's first
    stage) the top-1 agreement and the logits' relative error ‖f − f_ref‖_F / ‖f_ref‖_F; the
    sparsity report (per-layer kept fraction and FLOPs) and bytes on disk.

    Writes ``evaluation-<split>.json`` into the stage directory (against another reference than
    the chain's first stage: ``evaluation-<split>-vs-<hash of the reference>.json``, so no
    result made with other settings is overwritten) and returns it, with ``file`` the path
    written — or None and ``not_saved`` the reason when the stage cannot be written to (a
    read-only copy): the result is still returned.
    """
    if split not in ("train", "validation", "test"):
        raise StageError(f"split must be train, validation or test, got {split!r}.")
    path = pathlib.Path(directory).expanduser().absolute()
    manifest = read_manifest(path)
    loaded = load(path)
    data = load_data(manifest, data_dir)
    images, labels = getattr(data, split).images, getattr(data, split).labels
    root = checked_link(path, manifest, "root")
    if reference is not None:
        reference = pathlib.Path(reference).expanduser().absolute()
    name = f"evaluation-{split}.json"
    if reference is not None and reference != root:
        digest = hashlib.sha256(str(reference).encode()).hexdigest()[:8]
        name = f"evaluation-{split}-vs-{digest}.json"
    reference = reference or root
    if data.is_text:  # logits per byte: streamed, never all in memory
        result = {"directory": str(path), "stage": manifest["stage"], "split": split,
                  **_text_metrics(loaded, load(reference) if reference else None, images,
                                  labels)}
        if reference:
            result["reference"] = str(pathlib.Path(reference).absolute())
        reference = None
    else:
        logits = loaded.predict(images)
        result = {"directory": str(path), "stage": manifest["stage"], "split": split,
                  "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
                  "examples": int(len(labels))}
    if reference:
        reference_loaded = load(reference)
        reference_logits = reference_loaded.predict(images)
        result.update(reference=str(pathlib.Path(reference).absolute()),
                      top1_agreement=float(np.mean(np.argmax(logits, -1)
                                              == np.argmax(reference_logits, -1))),
                      logits_relative_error=float(np.linalg.norm(logits - reference_logits)
                                                  / np.linalg.norm(reference_logits)),
                      reference_accuracy=float(np.mean(np.argmax(reference_logits, -1)
                                                       == labels)))
    if loaded.compact is None:
        result["sparsity"] = stage_sparsity(loaded.model, loaded.params, loaded.model_state,
                                       images[:1]).as_dict()
        result["bytes_on_disk"] = directory_bytes(path / "network")
    else:
        result["weights_stored"] = loaded.compact.weights()
        result["bytes_on_disk"] = directory_bytes(path / "compact")
    file = path / name
    try:
        tmp = path / f".{name}.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, file)
        result["file"] = str(file)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        result.update(file=None, not_saved=f"cannot write to {path}: {error.strerror or error}")
    return result


def _text_metrics(loaded, reference, tokens, labels, batch_size: int = 256) -> dict:
    """A language model's next-byte cross-entropy (and perplexity, bits per byte) and top-1
    accuracy on ``tokens`` (n, T); with a ``reference`` stage, the top-1 agreement with it and
    the logits' relative error ‖f − f_ref‖_F / ‖f_ref‖_F. In batches of windows."""
    sums = dict(loss=0.0, correct=0, agree=0, reference_correct=0, difference=0.0, norm=0.0)
    for start in range(0, len(tokens), batch_size):
        x, y = tokens[start:start + batch_size], labels[start:start + batch_size]
        logits = loaded.predict(x, batch_size=batch_size).astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        sums["loss"] += float(-np.take_along_axis(log_probs, y[..., None].astype(int),
                                                  -1).sum())
        sums["correct"] += int(np.sum(np.argmax(logits, -1) == y))
        if reference is not None:
            other = reference.predict(x, batch_size=batch_size).astype(np.float64)
            sums["agree"] += int(np.sum(np.argmax(logits, -1) == np.argmax(other, -1)))
            sums["reference_correct"] += int(np.sum(np.argmax(other, -1) == y))
            sums["difference"] += float(np.square(logits - other).sum())
            sums["norm"] += float(np.square(other).sum())
    count = labels.size
    loss = sums["loss"] / count
    result = {"loss": loss, "perplexity": float(np.exp(loss)),
              "bits_per_byte": loss / float(np.log(2)), "accuracy": sums["correct"] / count,
              "examples": int(len(labels)), "positions": int(count)}
    if reference is not None:
        result.update(top1_agreement=sums["agree"] / count,
                      reference_accuracy=sums["reference_correct"] / count,
                      logits_relative_error=float(np.sqrt(sums["difference"] / sums["norm"])))
    return result
