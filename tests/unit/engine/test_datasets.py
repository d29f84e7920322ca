"""Datasets: lookup order, the offline error, generated sets, npz files, shaping for a job."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import numpy as np
import pytest

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import datasets
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.errors import DatasetInvalid, DatasetUnavailable


def write_idx(folder: Path, n_train: int = 12, n_test: int = 5, fill: int = 7) -> None:
    folder.mkdir(parents=True)
    for name, n, shape in (
        ("train-images-idx3-ubyte.gz", n_train, (28, 28)),
        ("train-labels-idx1-ubyte.gz", n_train, ()),
        ("t10k-images-idx3-ubyte.gz", n_test, (28, 28)),
        ("t10k-labels-idx1-ubyte.gz", n_test, ()),
    ):
        dims = (n, *shape)
        header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        body = np.full(dims, fill if shape else 3, dtype=np.uint8).tobytes()
        with gzip.open(folder / name, "wb") as f:
            f.write(header + body)


def empty_paths(tmp_path: Path, download: bool = False) -> DataPaths:
    return DataPaths(
        data_dir=tmp_path / "data",
        keras_home=tmp_path / "keras",
        system_dir=tmp_path / "system",
        download=download,
    )


def test_data_dir_comes_before_the_system_copy(tmp_path):
    paths = empty_paths(tmp_path)
    write_idx(paths.system_dir / "fashion-mnist", fill=1)
    write_idx(paths.data_dir / "fashion_mnist", n_train=20, fill=9)
    arrays = datasets.LOADERS.get("fashion_mnist")(None, paths, 0)
    assert arrays.x_train.shape == (20, 28, 28) and arrays.x_train.max() == 9
    assert arrays.source == str(paths.data_dir / "fashion_mnist")


def test_keras_cache_then_system_dir(tmp_path):
    paths = empty_paths(tmp_path)
    write_idx(paths.system_dir / "fashion-mnist", fill=1)
    assert datasets.LOADERS.get("fashion_mnist")(None, paths, 0).x_train.max() == 1
    write_idx(paths.keras_home / "datasets" / "fashion-mnist", fill=2)
    assert datasets.LOADERS.get("fashion_mnist")(None, paths, 0).x_train.max() == 2


def test_mnist_npz_in_the_keras_cache(tmp_path):
    paths = empty_paths(tmp_path)
    (paths.keras_home / "datasets").mkdir(parents=True)
    x = np.zeros((4, 28, 28), np.uint8)
    np.savez(
        paths.keras_home / "datasets" / "mnist.npz",
        x_train=x,
        y_train=np.arange(4),
        x_test=x,
        y_test=np.arange(4),
    )
    assert datasets.LOADERS.get("mnist")(None, paths, 0).x_train.shape == (4, 28, 28)


def test_missing_without_download_says_where_it_looked(tmp_path):
    paths = empty_paths(tmp_path)
    with pytest.raises(DatasetUnavailable) as caught:
        datasets.LOADERS.get("mnist")(None, paths, 0)
    message = str(caught.value)
    for place in (
        paths.data_dir / "mnist.npz",
        paths.keras_home / "datasets" / "mnist.npz",
        paths.system_dir / "mnist",
    ):
        assert str(place) in message
    assert "To fix" in message


def _online() -> bool:
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online(), reason="this check needs a machine without internet access")
def test_offline_download_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(DatasetUnavailable) as caught:
        datasets.LOADERS.get("mnist")(None, empty_paths(tmp_path, download=True), 0)
    message = str(caught.value)
    assert "downloading it failed" in message and str(tmp_path / "system" / "mnist") in message


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is installed by scripts/install",
)
def test_debian_fashion_mnist_is_found():
    arrays = datasets.LOADERS.get("fashion_mnist")(None, DataPaths(download=False), 0)
    assert arrays.x_train.shape == (60000, 28, 28) and arrays.x_test.shape == (10000, 28, 28)
    assert sorted(np.unique(arrays.y_train)) == list(range(10))


def test_linear_is_the_seed_line():
    spec = JobSpec.parse({"dataset": "linear", "model": "linear"})
    a = datasets.LOADERS.get("linear")(spec.dataset, DataPaths(), 0)
    assert a.x_train.shape == (100, 1)
    np.testing.assert_allclose(a.y_train, 0.1 * a.x_train + 0.3, rtol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "synthetic_classification",
        "synthetic_regression",
        "synthetic_images",
        "synthetic_sequence",
        "linear",
    ],
)
def test_generated_sets_are_reproducible(name):
    spec = JobSpec.parse({"dataset": name, "model": "rnn" if "sequence" in name else "mlp"})
    one = datasets.LOADERS.get(name)(spec.dataset, DataPaths(), 3)
    two = datasets.LOADERS.get(name)(spec.dataset, DataPaths(), 3)
    other = datasets.LOADERS.get(name)(spec.dataset, DataPaths(), 4)
    np.testing.assert_array_equal(one.x_train, two.x_train)
    assert not np.array_equal(one.x_train, other.x_train)


def test_labels_follow_the_loss():
    def shaped(loss, **ds):
        spec = JobSpec.parse({"dataset": {"name": "synthetic_classification", **ds}, "loss": loss})
        return datasets.load(spec, DataPaths())

    sparse = shaped("sparse_categorical_crossentropy", num_classes=3)
    assert sparse.y_train.ndim == 1 and sparse.output_units == 3
    one_hot = shaped("categorical_crossentropy", num_classes=3)
    assert one_hot.y_train.shape[1:] == (3,) and set(np.unique(one_hot.y_train)) == {0.0, 1.0}
    binary = shaped("binary_crossentropy", num_classes=2)
    assert binary.y_train.shape[1:] == (1,) and binary.output_units == 1


def test_images_are_scaled_and_flattened_for_an_mlp(tmp_path):
    paths = empty_paths(tmp_path)
    write_idx(paths.data_dir / "fashion_mnist", fill=255)
    mlp = datasets.load(JobSpec.parse({"model": "mlp"}), paths)
    assert mlp.x_train.shape == (12, 784) and mlp.x_train.max() == 1.0
    cnn = datasets.load(JobSpec.parse({"model": "cnn"}), paths)
    assert cnn.x_train.shape == (12, 28, 28, 1)
    rnn = datasets.load(JobSpec.parse({"model": "rnn"}), paths)
    assert rnn.x_train.shape == (12, 28, 28)


def test_validation_split(tmp_path):
    spec = JobSpec.parse(
        {
            "dataset": {
                "name": "synthetic_classification",
                "num_samples": 200,
                "validation_split": 0.25,
            }
        }
    )
    data = datasets.load(spec, DataPaths())
    assert len(data.x_train) == 150 and len(data.x_val) == 50
    assert data.eval_split[0] == "validation"


def test_npz_files(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(30, 4).astype("float32"), y=np.arange(30) % 3)
    spec = JobSpec.parse({"dataset": {"name": "npz", "path": str(path)}})
    data = datasets.load(spec, DataPaths())
    assert data.task == "classification" and data.num_classes == 3 and data.x_test is None
    np.savez(tmp_path / "r.npz", x_train=np.random.rand(30, 4), y_train=np.random.rand(30))
    spec = JobSpec.parse(
        {"dataset": {"name": "npz", "path": "r.npz"}, "loss": "mse", "metrics": ["mae"]}
    )
    assert datasets.load(spec, DataPaths(data_dir=tmp_path)).task == "regression"


@pytest.mark.parametrize(
    ("arrays", "phrase"),
    [
        ({"a": np.zeros(3)}, "needs x_train and y_train"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, dtype=int)}, "x has 3 rows but y has 4"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, phrase):
    np.savez(tmp_path / "bad.npz", **arrays)
    spec = JobSpec.parse({"dataset": {"name": "npz", "path": str(tmp_path / "bad.npz")}})
    with pytest.raises(DatasetInvalid, match=phrase):
        datasets.load(spec, DataPaths())


def test_missing_npz(tmp_path):
    spec = JobSpec.parse({"dataset": {"name": "npz", "path": "nope.npz"}})
    with pytest.raises(DatasetUnavailable, match="no such file"):
        datasets.load(spec, DataPaths(data_dir=tmp_path))


def test_cnn_on_tabular_npz_is_refused_at_load(tmp_path):
    np.savez(tmp_path / "t.npz", x=np.zeros((5, 3), "float32"), y=np.arange(5) % 2)
    spec = JobSpec.parse(
        {"dataset": {"name": "npz", "path": str(tmp_path / "t.npz")}, "model": "cnn"}
    )
    with pytest.raises(DatasetInvalid, match="cnn needs images"):
        datasets.load(spec, DataPaths())


# ---------------------------------------------------------------- npz paths on a worker


def worker_paths(tmp_path: Path) -> DataPaths:
    data = tmp_path / "data"
    (data / "uploads" / "team-a").mkdir(parents=True)
    return DataPaths(data_dir=data, uploads=data / "uploads", download=False)


def npz_spec(path: str) -> JobSpec:
    return JobSpec.parse({"dataset": {"name": "npz", "path": path}})


def small_npz(path: Path) -> Path:
    np.savez(path, x=np.zeros((6, 2), "float32"), y=np.arange(6) % 2)
    return path


def test_a_worker_reads_an_upload_by_its_key(tmp_path):
    paths = worker_paths(tmp_path)
    small_npz(paths.uploads / "team-a" / "mine.npz")
    data = datasets.load(npz_spec("uploads/team-a/mine.npz"), paths)
    assert data.source == "uploads/team-a/mine.npz"  # as the tenant wrote it, no server path


@pytest.mark.parametrize(
    "path",
    [
        "uploads/team-a/link.npz",  # a symlink to a file outside
        "uploads/team-a/hop/in.npz",  # a symlinked folder pointing outside
        "uploads/team-b/../team-a/outside.npz",
        "elsewhere.npz",  # in the data folder, not in its uploads
    ],
)
def test_a_worker_reads_nothing_outside_the_uploads_folder(tmp_path, path):
    paths = worker_paths(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    small_npz(outside / "in.npz")
    (paths.uploads / "team-a" / "link.npz").symlink_to(outside / "in.npz")
    (paths.uploads / "team-a" / "hop").symlink_to(outside, target_is_directory=True)
    small_npz(paths.data_dir / "elsewhere.npz")
    with pytest.raises(DatasetUnavailable, match="not one of the uploads") as caught:
        datasets.load(npz_spec(path), paths)
    assert str(tmp_path) not in str(caught.value)


def test_a_relative_path_is_never_looked_up_in_the_working_directory(tmp_path, monkeypatch):
    paths = worker_paths(tmp_path)
    here = tmp_path / "cwd"
    (here / "uploads" / "team-a").mkdir(parents=True)
    small_npz(here / "uploads" / "team-a" / "only-here.npz")
    monkeypatch.chdir(here)
    for where in (paths, DataPaths(data_dir=paths.data_dir)):
        with pytest.raises(DatasetUnavailable, match="no such file"):
            datasets.load(npz_spec("uploads/team-a/only-here.npz"), where)


def test_a_path_too_long_for_the_file_system_is_simply_not_there(tmp_path):
    paths = worker_paths(tmp_path)
    long = "uploads/team-a/" + "x" * 300 + ".npz"  # over a file name's limit (NAME_MAX)
    with pytest.raises(DatasetUnavailable) as caught:
        datasets.load(npz_spec(long), paths)
    assert str(tmp_path) not in str(caught.value) and len(str(caught.value)) < 400
