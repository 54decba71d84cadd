"""Stage directories: the manifest, reuse of a finished stage with the same key and refusal of
another, removal of what a failed stage created, saving and loading the networks."""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import sys
from importlib import metadata
from typing import Mapping, Sequence

import jax
import numpy as np

from hoyertrim.distributed import is_writer
from hoyertrim.pipeline.errors import StageConflict, StageError, StageInterrupted


MANIFEST = "hoyertrim.json"
LOCK = ".hoyertrim.lock"  # held (flock) by the one command writing the stage
FORMAT = 1
_CHECKED = ("network", "compact")  # what a stage writes for later stages to read
# What an unfinished stage leaves that a re-run continues from: training checkpoints, and the
# layers a layer-wise stage has already solved.
_RESUMABLE = ("checkpoints/[0-9]*", "layers/*.npz")
_REQUIRED = ("format", "stage", "model", "dataset", "config", "status")


def default_directory(stage: str, model: str, settings: Mapping, root="runs") -> pathlib.Path:
    """``root/<stage>-<model>-<hash of settings>``: where a stage goes when not told, so the same
    settings (which include the parent directory) find the same directory and others another."""
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    short = model.rpartition(":")[2].split("/")[-1].lower() or "model"
    return pathlib.Path(root) / f"{stage}-{short}-{digest.hexdigest()[:8]}"


def read_manifest(directory) -> dict:
    """The manifest of a stage directory.

    Raises:
      StageError: the directory does not exist or is not a stage directory.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    if not path.is_dir():
        raise StageError(f"{directory} does not exist.")
    file = path / MANIFEST
    if not file.is_file():
        raise StageError(f"{directory} is not a hoyertrim stage directory (no {MANIFEST}); "
                         "give one that a hoyertrim command wrote.")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise StageError(f"{file} is damaged ({error}).") from error
    if not isinstance(manifest, dict):
        raise StageError(f"{file} is damaged (a JSON {type(manifest).__name__}, not the "
                         "manifest's object).")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise StageError(f"{file} is damaged (no {', '.join(missing)}).")
    if not isinstance(manifest["model"], dict) or not isinstance(
            manifest["model"].get("spec"), str) or not isinstance(manifest["config"], dict):
        raise StageError(f"{file} is damaged (its model or config is not what a hoyertrim "
                         "command writes).")
    if manifest.get("format") != FORMAT:
        raise StageError(f"{directory} was written in format {manifest.get('format')}; this "
                         f"hoyertrim reads format {FORMAT}.")
    return manifest


def _versions() -> dict:
    names = ("hoyertrim", "jax", "jaxlib", "flax", "optax", "jaxopt", "orbax-checkpoint", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], **found, "backend": jax.default_backend()}


def _key(manifest: Mapping) -> dict:
    return {k: manifest.get(k) for k in ("stage", "model", "dataset", "parent", "parent_digest",
                                         "config")}


def _differences(old: Mapping, new: Mapping, prefix="") -> list[str]:
    found = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            found.append(f"{prefix}{k}: {a!r} there, {b!r} asked")
    return found


class Stage:
    """Opens a stage directory for a manifest: reuses a finished one with the same key, refuses
    one with another, holds a lock against a second writer, and on failure removes what it
    created unless the stage left work to resume (then the manifest says ``interrupted``).

    With several processes (`jax.distributed`) every process makes the same checks and runs
    the stage; only process 0 (``writer``) writes anything into the folder."""

    def __init__(self, out, manifest: dict):
        self.out = pathlib.Path(out).expanduser().absolute()
        self.manifest = manifest
        self.done = False
        self.created = False
        self.writer = is_writer()
        self._lock = None

    def __enter__(self) -> "Stage":
        self.manifest = _relative_links(self.manifest, self.out)
        if not self.writer:
            return self._open()
        if not (self.out / MANIFEST).is_file() and self.out.exists() and (
                not self.out.is_dir() or any(p.name != LOCK for p in self.out.iterdir())):
            raise StageError(f"{self.out} exists and is not a hoyertrim stage directory; choose "
                             "another --out.")
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StageError(f"Cannot write to {self.out}: {error.strerror or error}.") from error
        self._acquire()
        try:
            return self._open()
        except BaseException:  # refused (another run's folder) or stopped: nothing of ours
            try:
                if self.created:
                    shutil.rmtree(self.out, ignore_errors=True)
            finally:
                self._release()
            raise

    def _acquire(self) -> None:
        """An exclusive ``flock`` on the stage's lock file: the kernel releases it when the
        process ends however it ends, so a killed run never leaves a stale lock."""
        path = self.out / LOCK
        while True:
            try:
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise StageError(f"Cannot write to {self.out}: {error.strerror or error}."
                                 ) from error
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(handle)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise StageError(f"{self.out} is being written by another hoyertrim command; "
                                 "wait for it to finish or choose another --out.") from None
            try:  # the file we locked is still the one at the path (not one removed meanwhile)
                if os.stat(path).st_ino == os.fstat(handle).st_ino:
                    self._lock = handle
                    return
            except FileNotFoundError:
                pass
            os.close(handle)

    def _release(self) -> None:
        if self._lock is not None:
            try:
                (self.out / LOCK).unlink(missing_ok=True)
            finally:
                os.close(self._lock)
                self._lock = None

    def _open(self) -> "Stage":
        file = self.out / MANIFEST
        if file.is_file():
            old = read_manifest(self.out)
            old_key, new_key = self._key(old), self._key(self.manifest)
            if "parent_digest" not in old:  # written before parents were hashed
                new_key.pop("parent_digest", None)
            differences = _differences(old_key, new_key)
            if differences:
                raise StageConflict(self.out, differences)
            if old.get("status") == "complete":
                self.manifest, self.done = old, True
                return self
        try:
            self._write({**self.manifest, "status": "running"})
        except OSError as error:
            raise StageError(f"Cannot write to {self.out}: {error.strerror or error}.") from error
        return self

    def _key(self, manifest) -> dict:
        """What identifies a run, its links as absolute paths (so a manifest written with
        absolute links still matches)."""
        links = {k: str(linked(self.out, manifest, k) or "") for k in ("parent",)}
        return {**_key(manifest), **links}

    def _write(self, manifest):
        if not self.writer:
            return
        tmp = self.out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=json_default) + "\n")
        os.replace(tmp, self.out / MANIFEST)

    def finish(self, results: Mapping) -> None:
        self.manifest = {**self.manifest, "status": "complete", "results": dict(results),
                         "files": checksums(self.out) if self.writer else {}}
        self._write(self.manifest)

    def resumable(self) -> bool:
        """Whether the unfinished stage left work a re-run continues from."""
        return any(any(self.out.glob(pattern)) for pattern in _RESUMABLE)

    def _abandon(self) -> bool:
        """After a failure: removes what this stage created unless it can be resumed (then
        marks it ``interrupted``); releases the lock. Returns whether it can be resumed."""
        resumable = self.resumable()
        if not self.writer:
            return resumable
        try:
            if resumable:
                self._write({**self.manifest, "status": "interrupted"})
            elif self.created:
                shutil.rmtree(self.out, ignore_errors=True)
            elif (self.out / MANIFEST).is_file() and not any(
                    p.name not in (MANIFEST, LOCK) for p in self.out.iterdir()):
                # An existing directory we only added a running manifest to: leave it empty.
                (self.out / MANIFEST).unlink()
        finally:
            self._release()
        return resumable

    def __exit__(self, kind, error, traceback):
        if kind is None or self.done:
            self._release()
            return False
        resumable = self._abandon()
        if issubclass(kind, KeyboardInterrupt) and not isinstance(error, StageInterrupted):
            raise StageInterrupted(self.out, resumable) from error
        return False


def _sha256(file: pathlib.Path) -> str:
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checksums(directory) -> dict[str, str]:
    """``{path relative to the stage: sha256}`` of every file under the stage's ``network/``
    and ``compact/`` folders (what later stages and `load` read)."""
    directory = pathlib.Path(directory)
    return {file.relative_to(directory).as_posix(): _sha256(file)
            for folder in _CHECKED if (directory / folder).is_dir()
            for file in sorted((directory / folder).rglob("*")) if file.is_file()}


def verify(directory, manifest: Mapping | None = None) -> int:
    """Checks the files a finished stage wrote against the checksums its manifest records
    (stages written before checksums were recorded have none to check); returns how many files
    were checked.

    Raises:
      StageError: a recorded file is missing or its content changed (named in the message).
    """
    path = pathlib.Path(directory).expanduser().absolute()
    manifest = read_manifest(path) if manifest is None else manifest
    recorded = manifest.get("files") or {}
    if not isinstance(recorded, Mapping):
        raise StageError(f"{path / MANIFEST} is damaged (its 'files' is not a mapping).")
    for name, digest in recorded.items():
        file = path / name
        if not file.is_file():
            raise StageError(f"{file} is missing from the {manifest.get('stage')} stage; run "
                             "its command again into a fresh --out.")
        if _sha256(file) != digest:
            raise StageError(f"{file} has changed since the {manifest.get('stage')} stage wrote "
                             "it (its checksum differs): the file is damaged or was edited; run "
                             "the stage's command again into a fresh --out.")
    return len(recorded)


def linked(directory, manifest: Mapping, key: str) -> pathlib.Path | None:
    """The stage a manifest links to (``"parent"`` or ``"root"``), as an absolute path: links
    are recorded relative to the stage directory, so a chain copied or moved together keeps
    pointing at its own stages (links written as absolute paths are read as they are)."""
    value = manifest.get(key)
    if not value:
        return None
    path = pathlib.Path(value)
    if path.is_absolute():
        return path
    base = pathlib.Path(directory).expanduser().absolute()
    return pathlib.Path(os.path.normpath(base / path))


def digest(manifest: Mapping) -> str | None:
    """A stage's identity: the sha256 of the checksums of the files it wrote (None for a
    stage written before checksums were recorded). A child records its parent's and its
    root's, so a chain whose stages were mixed with another run's is found out."""
    files = manifest.get("files")
    if not files:
        return None
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def checked_link(directory, manifest: Mapping, key: str) -> pathlib.Path | None:
    """`linked`, after checking that the stage found there is the one this stage was made from
    (its digest equals the one recorded in ``manifest``, where one was).

    Raises:
      StageError: the linked stage is missing, unfinished or another run.
    """
    path = linked(directory, manifest, key)
    recorded = manifest.get(f"{key}_digest")
    if path is None or not recorded:
        return path
    other = read_manifest(path)
    if digest(other) != recorded:
        raise StageError(f"{path} is not the stage {directory} was made from (its files differ "
                         f"from the ones {directory} recorded for its {key}): the chain was "
                         "mixed with another run; run the stages again into fresh folders.")
    return path


def _relative_links(manifest: dict, out: pathlib.Path) -> dict:
    links = {key: os.path.relpath(manifest[key], out) for key in ("parent", "root")
             if manifest.get(key)}
    return {**manifest, **links}


def json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def new_manifest(stage: str, config: Mapping, *, parent: Mapping | None = None,
              parent_dir=None, model: Mapping | None = None, dataset: str | None = None,
              command: Sequence[str] | None = None) -> dict:
    return {
        "format": FORMAT, "stage": stage,
        "model": model if model is not None else parent["model"],
        "dataset": dataset if dataset is not None else parent["dataset"],
        "input_shape": None if parent is None else parent["input_shape"],
        "parent": None if parent_dir is None else str(pathlib.Path(parent_dir).absolute()),
        "root": None if parent is None else str(linked(parent_dir, parent, "root")
                                                 or pathlib.Path(parent_dir).absolute()),
        "parent_digest": None if parent is None else digest(parent),
        "root_digest": None if parent is None else (
            parent.get("root_digest") if parent.get("root") else digest(parent)),
        "config": dict(config),
        "provenance": {"command": list(command) if command is not None else list(sys.argv),
                       "versions": _versions(),
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds")},
    }


@dataclasses.dataclass
class StageResult:
    """Where a stage wrote and what it measured (``reused``: an identical finished stage)."""

    directory: pathlib.Path
    stage: str
    results: dict
    reused: bool


def stage_result(stage: Stage) -> StageResult:
    return StageResult(stage.out, stage.manifest["stage"], dict(stage.manifest.get("results", {})),
                       stage.done)


def directory_bytes(path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
