import dataclasses
import os
import pathlib
import sys
import warnings

import pytest

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests use examples/ (models written as users write them)
    sys.path.insert(0, str(REPO))


_REAL_DATA = {"data_root", "mnist", "small_mnist"}


def pytest_configure(config):
    """The quick tier (-m "not slow") compiles with XLA's optimizations off, as JAX's own test
    suite does: its problems are tiny, so compile time is nearly all of its run time. The full
    suite (what CI runs) compiles as users do."""
    if (config.option.markexpr or "").replace(" ", "") == "notslow":
        import jax
        jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
    """Tests on real MNIST are `slow`: `pytest -m "not slow"` is the quick tier."""
    for item in items:
        if _REAL_DATA & set(getattr(item, "fixturenames", ())):
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
