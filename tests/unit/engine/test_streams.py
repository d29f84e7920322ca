"""File datasets: each format trains a tiny job, in memory and streamed; splits from files;
categorical columns; bad files answered with DatasetInvalid naming what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import sklearn

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import datasets
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.streams import Stream
from stepstream_service.engine.trainer import train
from stepstream_service.errors import DatasetInvalid

IRIS = Path(sklearn.__file__).parent / "datasets" / "data" / "iris.csv"
IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width", "species"]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "uploads").mkdir()
    shutil.copy(IRIS, tmp_path / "uploads" / "iris.csv")
    return tmp_path


def job(dataset: dict, steps: int = 30, **training) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"architecture": "mlp", "hidden_units": [8]},
            "optimizer": {"name": "adam", "learning_rate": 0.05},
            "dataset": dataset,
            "training": {"steps": steps, "batch_size": 16, **training},
        }
    )


def run(spec: JobSpec, data_dir: Path, tmp_path: Path):
    events = []
    paths = DataPaths(data_dir=data_dir, uploads=data_dir / "uploads")
    result = train(spec, events.append, workdir=tmp_path / "work", paths=paths)
    return result, events


IRIS_SET = {"name": "csv", "path": "uploads/iris.csv", "column_names": IRIS_COLUMNS}


@pytest.mark.parametrize("stream", [False, True])
def test_iris_csv_trains_in_memory_and_streamed(data_dir, tmp_path, stream, recwarn):
    spec = job({**IRIS_SET, "stream": stream, "validation_split": 0.2}, steps=150, eval_every=150)
    loaded = datasets.load(spec, DataPaths(data_dir=data_dir))
    assert isinstance(loaded, Stream) is stream
    assert loaded.train_rows + loaded.val_rows == 150 and loaded.val_rows > 10
    assert loaded.input_shape == (4,) and loaded.output_units == 3
    result, events = run(spec, data_dir, tmp_path)
    assert result.outcome == "succeeded" and result.steps == 150
    assert len([e for e in events if e.kind == "step"]) == 150
    assert result.final_eval["accuracy"] >= 0.8, result.final_eval
    # Evaluation reads a split of known length: Keras has no cause to warn it ran out.
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]


def tabular(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    color = rng.choice(np.array(["red", "green", "blue"]), n)
    y = ((x[:, 0] > 0) ^ (color == "red")).astype(np.int64)
    return {"a": x[:, 0], "b": x[:, 1], "color": color, "target": y}


def test_parquet_streamed_with_a_categorical_column_and_test_file(data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    up = data_dir / "uploads"
    pq.write_table(pa.table(tabular(600, 0)), up / "train.parquet", row_group_size=100)
    pq.write_table(pa.table(tabular(200, 1)), up / "test.parquet")
    spec = job(
        {
            "name": "parquet",
            "path": "uploads/train.parquet",
            "test_path": "uploads/test.parquet",
            "label": "target",
            "categorical": ["color"],
            "stream": True,
            "shuffle_buffer": 64,
        },
        steps=300,
    )
    loaded = datasets.load(spec, DataPaths(data_dir=data_dir))
    assert loaded.input_shape == (2 + 4,)  # a, b and color one-hot: 3 colours + unseen
    result, _ = run(spec, data_dir, tmp_path)
    assert result.outcome == "succeeded"
    assert result.test_metrics["accuracy"] >= 0.8, result.test_metrics


def test_csv_validation_file_and_string_labels(data_dir, tmp_path, recwarn):
    names = np.array(["setosa", "versicolor", "virginica"])
    rows = np.loadtxt(IRIS, delimiter=",", skiprows=1)
    up = data_dir / "uploads"
    for name, part in (("tr.csv", rows[::2]), ("va.csv", rows[1::2])):
        lines = ["f1,f2,f3,f4,species"] + [
            ",".join(f"{v:g}" for v in r[:4]) + f",{names[int(r[4])]}" for r in part
        ]
        (up / name).write_text("\n".join(lines) + "\n")
    spec = job(
        {
            "name": "csv",
            "path": "uploads/tr.csv",
            "validation_path": "uploads/va.csv",
            "stream": True,
        },
        steps=100,
        eval_every=100,
    )
    loaded = datasets.load(spec, DataPaths(data_dir=data_dir))
    assert loaded.num_classes == 3 and loaded.val_rows == 75 and loaded.train_rows == 75
    result, events = run(spec, data_dir, tmp_path)
    assert result.outcome == "succeeded"
    assert [e.split for e in events if e.kind == "eval"] == ["validation"]
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]


def test_tfrecord_with_a_feature_spec_streams(data_dir, tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(data_dir / "uploads" / "d.tfrecord")) as w:
        for _ in range(300):
            x = rng.standard_normal(3).astype(np.float32)
            feature = {
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x.sum() > 0)])),
            }
            w.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    spec = job(
        {
            "name": "tfrecord",
            "path": "uploads/d.tfrecord",
            "feature_spec": {"x": {"dtype": "float32", "shape": [3]}, "y": {"dtype": "int64"}},
            "label": "y",
            "validation_split": 0.2,
            "stream": True,
        },
        steps=200,
        eval_every=200,
    )
    result, _ = run(spec, data_dir, tmp_path)
    assert result.outcome == "succeeded"
    assert result.final_eval["accuracy"] >= 0.85, result.final_eval


def test_image_folder_is_decoded_and_resized_on_the_fly(data_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, cls in enumerate(("dark", "light")):
        folder = data_dir / "uploads" / "pics" / cls
        folder.mkdir(parents=True)
        for i in range(12):
            size = (10 + i % 3, 9 + i % 4)  # sizes differ: all are resized
            pixels = rng.integers(0, 100, (*size, 3)) + 150 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    spec = job(
        {"name": "image_folder", "path": "uploads/pics", "image_size": 8, "stream": True},
        steps=40,
    )
    loaded = datasets.load(spec, DataPaths(data_dir=data_dir))
    assert loaded.input_shape == (8 * 8 * 3,) and loaded.num_classes == 2
    result, _ = run(spec, data_dir, tmp_path)
    assert result.outcome == "succeeded" and result.steps == 40


@pytest.mark.parametrize(
    ("dataset", "text", "message"),
    [
        (
            {"features": ["a", "nope"], "label": "y"},
            "a,b,y\n1,2,0\n",
            "dataset.features: column 'nope'",
        ),
        ({"label": "target"}, "a,b,y\n1,2,0\n", "dataset.label: column 'target'"),
        ({"label": "y"}, "a,b,y\n1,x,0\n2,z,1\n", "must be listed in dataset.categorical"),
        ({}, "", "empty"),
        ({}, "a,b,y\n", "no rows"),
    ],
)
def test_bad_files_say_what_is_wrong(data_dir, dataset, text, message):
    (data_dir / "uploads" / "bad.csv").write_text(text)
    spec = job({"name": "csv", "path": "uploads/bad.csv", "stream": True, **dataset})
    with pytest.raises(DatasetInvalid, match=message.replace("(", r"\(")):
        datasets.load(spec, DataPaths(data_dir=data_dir))


def test_a_job_reads_only_uploads(data_dir):
    spec = job({**IRIS_SET, "path": "/etc/passwd"})
    with pytest.raises(Exception, match="not one of the uploads"):
        datasets.load(spec, DataPaths(data_dir=data_dir, uploads=data_dir / "uploads"))
    url = job({**IRIS_SET, "path": f"file://{IRIS}"})
    with pytest.raises(Exception, match="reads only uploads"):
        datasets.load(url, DataPaths(data_dir=data_dir, uploads=data_dir / "uploads", urls=False))
    assert datasets.load(url, DataPaths(data_dir=data_dir)).train_rows == 150
