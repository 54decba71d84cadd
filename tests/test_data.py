import pickle
import shutil

import numpy as np
import pytest

from hoyertrim import data


def test_mnist_splits_have_documented_shapes_and_ranges(mnist):
    assert mnist.train.images.shape == (55000, 28, 28, 1)
    assert mnist.validation.images.shape == (5000, 28, 28, 1)
    assert mnist.test.images.shape == (10000, 28, 28, 1)
    for split in (mnist.train, mnist.validation, mnist.test):
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
        assert split.images.min() == 0.0 and split.images.max() == 1.0
        assert set(np.unique(split.labels)) == set(range(10))
    # First MNIST test digits are 7, 2, 1, 0, 4 (a known fact of the file).
    assert mnist.test.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_validation_holdout_is_deterministic_and_disjoint(data_root, mnist):
    again = data.load_dataset("mnist", data_root, validation_size=5000)
    np.testing.assert_array_equal(again.validation.labels, mnist.validation.labels)
    train_rows = {r.tobytes() for r in mnist.train.images[:20000].reshape(20000, -1)}
    val_rows = [r.tobytes() for r in mnist.validation.images[:500].reshape(500, -1)]
    # MNIST has a few exact duplicates; a leak would make most rows collide.
    assert sum(r in train_rows for r in val_rows) < 5
    assert len(data.load_dataset("mnist", data_root, validation_size=1000).validation) == 1000


def test_env_var_is_used(data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("HOYERTRIM_DATA", str(data_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.locate("mnist", download=False) == data_root / "mnist"


def test_missing_data_lists_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("HOYERTRIM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_dataset("mnist", tmp_path / "empty", download=False)
    message = str(err.value)
    assert str(tmp_path / "empty" / "mnist") in message
    assert str(tmp_path / "cache" / "hoyertrim" / "mnist") in message
    assert "HOYERTRIM_DATA" in message


def test_failed_download_is_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("HOYERTRIM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DatasetNotFoundError, match="Download attempts failed"):
        data.locate("mnist", tmp_path / "empty", mirrors=[(tmp_path / "nowhere").as_uri() + "/"])


def test_download_verifies_and_writes_atomically(data_root, monkeypatch, tmp_path):
    monkeypatch.delenv("HOYERTRIM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mirror = (data_root / "mnist").as_uri() + "/"
    folder = data.locate("mnist", tmp_path / "empty", mirrors=[mirror])
    assert folder == tmp_path / "cache" / "hoyertrim" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(data._IDX_NAMES)  # no temp files


def test_corrupt_download_is_rejected_and_not_kept(data_root, monkeypatch, tmp_path):
    monkeypatch.delenv("HOYERTRIM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad_mirror = tmp_path / "mirror"
    shutil.copytree(data_root / "mnist", bad_mirror)
    (bad_mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the real file")
    with pytest.raises(data.ChecksumError):
        data.locate("mnist", tmp_path / "empty", mirrors=[bad_mirror.as_uri() + "/"])
    assert not (tmp_path / "cache" / "hoyertrim" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_truncated_file_gives_checksum_error(data_root, tmp_path):
    shutil.copytree(data_root / "mnist", tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.ChecksumError, match="truncated or corrupt"):
        data.load_dataset("mnist", tmp_path)


def test_parse_idx_roundtrip_and_errors():
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">u4").tobytes() + values.tobytes()
    np.testing.assert_array_equal(data.parse_idx(raw), values)
    with pytest.raises(ValueError, match="magic"):
        data.parse_idx(b"\x01\x00\x08\x01")
    with pytest.raises(ValueError, match="holds"):
        data.parse_idx(raw[:-1])


def test_cifar10_extracted_layout(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 20).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    ds = data.load_dataset("cifar10", tmp_path, validation_size=10, download=False)
    assert ds.train.images.shape == (90, 32, 32, 3) and ds.test.images.shape == (20, 32, 32, 3)
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][0]
    # CHW-planar rows become HWC images.
    np.testing.assert_allclose(ds.test.images[0, 0, 0], raw[[0, 1024, 2048]] / 255.0)


def test_unknown_dataset_and_bad_validation_size(data_root):
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="validation_size"):
        data.load_dataset("mnist", data_root, validation_size=60000)


def _text_root(tmp_path, files):
    folder = tmp_path / "python_stdlib"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return tmp_path


def test_text_corpus_windows_predict_the_next_byte_and_split_by_file(tmp_path):
    files = {f"pkg/m{i}.py": f"def f{i}(x):\n    return x * {i}\n" * 40 for i in range(60)}
    root = _text_root(tmp_path, files)
    dataset = data.load_dataset("python_stdlib", root)
    assert dataset.is_text and dataset.num_classes == 256 and dataset.input_dtype == np.uint8
    for split in (dataset.train, dataset.validation, dataset.test):
        assert split.images.shape[1] == data.TEXT_CONTEXT and split.labels.shape == split.images.shape
        # each label is the next byte of the same stream
        np.testing.assert_array_equal(split.labels[:, :-1], split.images[:, 1:])
        np.testing.assert_array_equal(split.labels[:-1, -1], split.images[1:, 0])
    assert dataset.info["files"] == 60 and "under" in dataset.info["source"]
    total = sum(len(t) for t in files.values())
    assert sum(dataset.info["bytes"].values()) <= total
    again = data.load_dataset("python_stdlib", root)
    assert again.info["file_list_sha256"] == dataset.info["file_list_sha256"]
    np.testing.assert_array_equal(again.test.images, dataset.test.images)
    (root / "python_stdlib" / "pkg" / "m0.py").write_text("changed\n" * 100)
    assert data.load_dataset("python_stdlib", root).info["file_list_sha256"] != \
        dataset.info["file_list_sha256"]


def test_missing_standard_library_sources_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("HOYERTRIM_DATA", raising=False)
    monkeypatch.setattr(data, "stdlib_sources", lambda: tmp_path / "stripped")
    monkeypatch.setattr(data, "default_cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(data.DatasetNotFoundError, match="Put any text files under"):
        data.load_text(tmp_path / "nothing")


def test_the_interpreters_own_sources_are_the_default_corpus():
    sources = data.stdlib_sources()
    if not any(sources.glob("*.py")):
        pytest.skip("this Python has no standard library sources")
    dataset = data.load_text(context=64)
    assert dataset.info["python"] and dataset.info["files"] > 100
    assert len(dataset.validation) > 0 and len(dataset.test) > 0
    assert len(dataset.train) > 10 * len(dataset.test)
