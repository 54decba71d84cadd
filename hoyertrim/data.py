"""Dataset loaders: MNIST, Fashion-MNIST and CIFAR-10 as numpy arrays.

Files are looked up, in order, under the ``data_dir`` argument, the ``HOYERTRIM_DATA`` environment
variable and the user cache directory; if none has them they are downloaded from the canonical
public mirrors into the cache (checksum-verified, written atomically). A data root holds one folder
per dataset, the layout of ``../shared/data``::

    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/fashion-mnist/...            (same four files)
    <root>/cifar10/cifar-10-python.tar.gz   (or the extracted cifar-10-batches-py/)

Every file is md5-checked before it is parsed, so a truncated or corrupt download raises
`ChecksumError` instead of yielding silently wrong data.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np

DATA_ENV_VAR = "HOYERTRIM_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a dataset could be found or downloaded."""


class ChecksumError(ValueError):
    """A dataset file does not have the expected md5 (truncated or corrupt)."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: ``images`` float32 (n, H, W, C) in [0, 1], ``labels`` int32 (n,); for a text
    corpus ``images`` are uint8 byte windows (n, T) and ``labels`` the next bytes (n, T)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits; validation is a deterministic hold-out of train."""

    name: str
    train: Split
    validation: Split
    test: Split
    num_classes: int
    info: dict = dataclasses.field(default_factory=dict)  # provenance (a text corpus's files)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])

    @property
    def input_dtype(self):
        """The inputs' dtype (float32 images, uint8 bytes)."""
        return self.train.images.dtype

    def with_train_examples(self, count: int | None) -> "Dataset":
        """The same data with ``count`` training examples (a fixed random subset, seed 0)."""
        if count is None or count >= len(self.train):
            return self
        if count <= 0:
            raise ValueError(f"The number of training examples must be positive, got {count}.")
        chosen = np.sort(np.random.default_rng(0).permutation(len(self.train))[:count])
        return dataclasses.replace(self, train=Split(self.train.images[chosen],
                                                     self.train.labels[chosen]))

    @property
    def is_text(self) -> bool:
        """Per-position labels (a language model's next bytes)."""
        return self.train.labels.ndim == 2


@dataclasses.dataclass(frozen=True)
class _File:
    name: str
    md5: str


@dataclasses.dataclass(frozen=True)
class _Spec:
    folder: str
    files: tuple[_File, ...]
    mirrors: tuple[str, ...]
    num_classes: int = 10


_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

_SPECS = {
    "mnist": _Spec(
        folder="mnist",
        files=tuple(
            _File(n, h)
            for n, h in zip(
                _IDX_NAMES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            )
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion_mnist": _Spec(
        folder="fashion-mnist",
        files=tuple(
            _File(n, h)
            for n, h in zip(
                _IDX_NAMES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            )
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
    ),
    "cifar10": _Spec(
        folder="cifar10",
        files=(_File("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
    ),
}

TEXT_DATASETS = ("python_stdlib",)
DATASETS: tuple[str, ...] = tuple(_SPECS) + TEXT_DATASETS


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/hoyertrim`` (default ``~/.cache/hoyertrim``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "hoyertrim"


def _md5(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _verify(path: pathlib.Path, expected_md5: str) -> None:
    actual = _md5(path)
    if actual != expected_md5:
        raise ChecksumError(
            f"{path} has md5 {actual}, expected {expected_md5}: the file is truncated or corrupt. "
            "Delete it and provide a fresh copy (or let hoyertrim download it again)."
        )


def _download(url: str, destination: pathlib.Path, expected_md5: str) -> None:
    """Downloads to a temporary file beside ``destination``, verifies, then renames atomically."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        _verify(tmp, expected_md5)
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def _candidate_roots(data_dir: str | os.PathLike | None) -> list[tuple[str, pathlib.Path]]:
    roots = []
    if data_dir is not None:
        roots.append(("data_dir argument", pathlib.Path(data_dir)))
    if os.environ.get(DATA_ENV_VAR):
        roots.append((f"${DATA_ENV_VAR}", pathlib.Path(os.environ[DATA_ENV_VAR])))
    roots.append(("cache", default_cache_dir()))
    return roots


def _has_files(folder: pathlib.Path, spec: _Spec) -> bool:
    if spec.folder == "cifar10" and (folder / "cifar-10-batches-py" / "test_batch").is_file():
        return True
    return all((folder / f.name).is_file() for f in spec.files)


def locate(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
           mirrors: Sequence[str] | None = None) -> pathlib.Path:
    """Returns the folder holding dataset ``name``'s files, downloading into the cache if needed.

    Args:
      name: one of `DATASETS`.
      data_dir: a data root with one folder per dataset; searched first.
      download: whether to fetch missing files from the public mirrors into the cache.
      mirrors: base URLs to try instead of the canonical mirrors.

    Raises:
      DatasetNotFoundError: no copy anywhere and the download failed (the message lists where it
        looked and how to provide the files).
      ChecksumError: a downloaded file did not match its md5.
    """
    spec = _spec(name)
    roots = _candidate_roots(data_dir)
    for _, root in roots:
        if _has_files(root / spec.folder, spec):
            return root / spec.folder
    cache = default_cache_dir() / spec.folder
    errors = []
    if download:
        for f in spec.files:
            if (cache / f.name).is_file():
                continue
            for base in mirrors or spec.mirrors:
                try:
                    _download(base + f.name, cache / f.name, f.md5)
                    break
                except (urllib.error.URLError, OSError, TimeoutError) as e:
                    errors.append(f"{base}{f.name}: {e}")
        if _has_files(cache, spec):
            return cache
    looked = "\n".join(f"  - {label}: {root / spec.folder}" for label, root in roots)
    files = ", ".join(f.name for f in spec.files)
    tried = ("\nDownload attempts failed:\n" + "\n".join(f"  - {e}" for e in errors)) if errors else ""
    raise DatasetNotFoundError(
        f"Dataset {name!r} not found. Looked in:\n{looked}{tried}\n"
        f"Put {files} into <root>/{spec.folder}/ and pass data_dir=<root>, or set "
        f"{DATA_ENV_VAR}=<root>, or connect to the internet so it can be downloaded."
    )


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return _SPECS[name]


def parse_idx(raw: bytes) -> np.ndarray:
    """Parses an (uncompressed) IDX file: 2 zero bytes, dtype code, ndim, big-endian dims, data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("Not an IDX file: bad magic number.")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"IDX file has unknown dtype code {raw[2]:#x}.")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX header says shape {shape} but the file holds {data.size} values.")
    return data.reshape(shape)


def _load_idx_dataset(folder: pathlib.Path, spec: _Spec):
    arrays = []
    for f in spec.files:
        path = folder / f.name
        _verify(path, f.md5)
        with gzip.open(path, "rb") as g:
            arrays.append(parse_idx(g.read()))
    train_x, train_y, test_x, test_y = arrays
    return train_x[..., None], train_y, test_x[..., None], test_y


def _load_cifar10(folder: pathlib.Path, spec: _Spec):
    extracted = folder / "cifar-10-batches-py"
    if (extracted / "test_batch").is_file():
        def read(member):
            return (extracted / member).read_bytes()
    else:
        path = folder / spec.files[0].name
        _verify(path, spec.files[0].md5)
        with tarfile.open(path, "r:gz") as tar:
            contents = {
                pathlib.PurePosixPath(m.name).name: tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile()
            }
        def read(member):
            return contents[member]

    def batch(member):
        d = pickle.load(io.BytesIO(read(member)), encoding="bytes")
        images = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(d[b"labels"])

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = batch("test_batch")
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            test_x, test_y)


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(images.astype(np.float32) / 255.0, labels.astype(np.int32))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                 validation_size: int = 5000, download: bool = True) -> Dataset:
    """Loads a dataset as train / validation / test `Split`s.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"python_stdlib"`` (`load_text`).
      data_dir: data root with one folder per dataset (see module docstring). Falls back to
        ``$HOYERTRIM_DATA``, the cache, then a download.
      validation_size: examples held out of the training set for validation. The hold-out is a
        fixed permutation (seed 0) of the training set, identical on every machine and call.
      download: allow downloading missing files into the cache.

    Returns:
      A `Dataset`; images float32 NHWC in [0, 1] (MNIST: (n, 28, 28, 1), CIFAR-10: (n, 32, 32, 3)),
      labels int32.
    """
    if name in TEXT_DATASETS:
        return load_text(data_dir)
    spec = _spec(name)
    folder = locate(name, data_dir, download=download)
    loader = _load_cifar10 if name == "cifar10" else _load_idx_dataset
    train_x, train_y, test_x, test_y = loader(folder, spec)
    if not 0 <= validation_size < len(train_y):
        raise ValueError(
            f"validation_size must be in [0, {len(train_y)}), got {validation_size}."
        )
    order = np.random.default_rng(0).permutation(len(train_y))
    val_idx, train_idx = np.sort(order[:validation_size]), np.sort(order[validation_size:])
    return Dataset(
        name=name,
        train=_split(train_x[train_idx], train_y[train_idx]),
        validation=_split(train_x[val_idx], train_y[val_idx]),
        test=_split(test_x, test_y),
        num_classes=spec.num_classes,
    )


# -- a text corpus every machine has ----------------------------------------------------------

TEXT_CONTEXT = 128  # bytes per window
_TEXT_FOLDER = "python_stdlib"
_HELD_OUT = 0.025  # of the files, each for validation and for test


def stdlib_sources() -> pathlib.Path:
    """The running interpreter's standard library folder (``sysconfig``'s ``stdlib``)."""
    import sysconfig
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _text_files(data_dir) -> tuple[pathlib.Path, list[pathlib.Path], str]:
    """(folder, its files in a fixed order, what they are)."""
    for _, root in _candidate_roots(data_dir):
        folder = root / _TEXT_FOLDER
        if folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            if files:
                return folder, files, f"text files under {folder}"
    folder = stdlib_sources()
    files = sorted(p for p in folder.rglob("*.py")
                   if "site-packages" not in p.relative_to(folder).parts
                   and "dist-packages" not in p.relative_to(folder).parts)
    if not files:
        raise DatasetNotFoundError(
            f"This Python has no standard library sources under {folder} (some minimal installs "
            f"strip them). Put any text files under <root>/{_TEXT_FOLDER}/ and pass --data-dir "
            "<root> (or set HOYERTRIM_DATA).")
    return folder, files, f"Python {sys.version.split()[0]} standard library sources"


def _bucket(relative: str) -> str:
    """A file's split, from a hash of its path: the same on every machine, and adding a file
    moves no other."""
    value = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "test" if value < _HELD_OUT else "validation" if value < 2 * _HELD_OUT else "train"


def _windows(data: bytes, context: int) -> Split:
    """Non-overlapping windows of ``context`` bytes and, as labels, each byte's next byte."""
    array = np.frombuffer(data, np.uint8)
    count = (len(array) - 1) // context
    inputs = array[:count * context].reshape(count, context)
    labels = array[1:count * context + 1].reshape(count, context)
    return Split(inputs.copy(), labels.copy())


def load_text(data_dir=None, *, context: int = TEXT_CONTEXT) -> Dataset:
    """A byte-level language-modelling corpus: the Python standard library's own source files
    (``*.py`` under `stdlib_sources`, site-packages excluded), or any text files under
    ``<data root>/python_stdlib/`` when that folder exists.

    Files are split by a hash of their relative path (2.5% validation, 2.5% test, the rest
    train),
    each split's files concatenated in path order and cut into windows of ``context`` bytes;
    ``labels`` are the next bytes (256 classes). ``Dataset.info`` records the source, the
    Python version, the file count, the bytes per split and a SHA-256 over the file list (paths
    and sizes), so a result can say which corpus it was measured on.
    """
    folder, files, source = _text_files(data_dir)
    parts = {"train": [], "validation": [], "test": []}
    listing = hashlib.sha256()
    for path in files:
        relative = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        listing.update(f"{relative}\t{len(data)}\n".encode())
        parts[_bucket(relative)].append(data)
    splits = {name: _windows(b"".join(chunks), context) for name, chunks in parts.items()}
    empty = [name for name, split in splits.items() if len(split) == 0]
    if empty:
        raise DatasetNotFoundError(f"The text under {folder} is too small: no {context}-byte "
                                   f"window for the {', '.join(empty)} split.")
    info = {"source": source, "python": sys.version.split()[0], "files": len(files),
            "file_list_sha256": listing.hexdigest(), "context": context,
            "bytes": {name: len(split) * context for name, split in splits.items()}}
    return Dataset(name="python_stdlib", train=splits["train"],
                   validation=splits["validation"], test=splits["test"], num_classes=256,
                   info=info)
