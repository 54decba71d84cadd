import atexit
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import pytest

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
# pytest-xdist runs several worker processes; on a GPU each would otherwise reserve most of its
# memory at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Most of the suite's time is XLA compiling, and the same programs (a LeNet train step, a
# Net-Trim solve) are compiled again by each xdist worker and each subprocess a test starts
# (the killed-and-resumed runs, the README's commands). One persistent compilation cache per
# pytest run, set up by the first process and inherited by the others, compiles each once; it
# starts empty (as in CI) and is removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="hoyertrim-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests use examples/ (models written as users write them)
    sys.path.insert(0, str(REPO))


# Fixtures that train on real MNIST, or run a whole pipeline chain (tests/test_cli.py).
_SLOW_FIXTURES = {"data_root", "mnist", "small_mnist", "chain"}


def pytest_configure(config):
    """The quick tier (-m "not slow") compiles with XLA's optimizations off, as JAX's own test
    suite does: its problems are tiny, so compile time is nearly all of its run time. The full
    suite (what CI runs) compiles as users do."""
    if (config.option.markexpr or "").replace(" ", "") == "notslow":
        import jax
        jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
    """Tests on real MNIST or a trained pipeline chain are `slow`: `pytest -m "not slow"` is the
    quick tier."""
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _data_root() -> pathlib.Path | None:
    for candidate in (os.environ.get("HOYERTRIM_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (pathlib.Path(candidate) / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file():
            return pathlib.Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """The MNIST data root. In CI (CI=true) a missing copy fails the run instead of skipping."""
    root = _data_root()
    if root is None:
        message = "MNIST not found: set HOYERTRIM_DATA to a data root holding mnist/."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    from hoyertrim.data import load_dataset
    return load_dataset("mnist", data_root)


@pytest.fixture(scope="session")
def small_mnist(mnist):
    """4,000 training / 1,000 validation / 2,000 test examples of real MNIST."""
    from hoyertrim.data import Split

    def head(split, n):
        return Split(split.images[:n], split.labels[:n])

    return dataclasses.replace(mnist, train=head(mnist.train, 4000),
                               validation=head(mnist.validation, 1000),
                               test=head(mnist.test, 2000))


def _write_idx(path: pathlib.Path, array) -> None:
    import gzip
    import struct

    import numpy as np
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> pathlib.Path:
    """A data root whose mnist/ holds a small learnable stand-in: 5,800 training images (5,000
    of them become the validation split) and 400 test images; the label picks which of ten
    6×6 patches is bright, over uniform noise. Its files are exempt from the md5 check (in this
    process) that real MNIST files must pass."""
    import numpy as np

    from hoyertrim import data
    root = tmp_path_factory.mktemp("tiny_data")
    verify = data._verify

    def verify_unless_tiny(path, expected_md5):
        if root not in pathlib.Path(path).parents:
            verify(path, expected_md5)

    data._verify = verify_unless_tiny
    folder = root / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def images(labels):
        x = rng.integers(0, 60, (len(labels), 28, 28))
        for i, label in enumerate(labels):
            r, c = 2 + 12 * (label // 5), 2 + 5 * (label % 5)
            x[i, r:r + 6, c:c + 6] += 190
        return x

    train_labels, test_labels = rng.integers(0, 10, 5800), rng.integers(0, 10, 400)
    _write_idx(folder / "train-images-idx3-ubyte.gz", images(train_labels))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", train_labels)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images(test_labels))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_labels)
    return root
