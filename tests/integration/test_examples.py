"""The reference results: each example job file trains to what the seed articles report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepstream.kernel.spec import load_spec
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.trainer import train

from ..conftest import EXAMPLES

pytestmark = pytest.mark.slow


def run_example(name: str, tmp_path, **training):
    spec = load_spec(EXAMPLES / name)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update=training)})
    events = []
    result = train(spec, events.append, workdir=tmp_path, paths=DataPaths(download=False))
    return result, events


def test_seed_mlp_on_fashion_mnist_reaches_085(tmp_path):
    result, events = run_example("mnist_mlp.yaml", tmp_path)
    assert result.outcome == "succeeded" and result.steps == 5001
    assert len([e for e in events if e.kind == "step"]) == 5001
    assert result.test_metrics["accuracy"] >= 0.85, result.test_metrics


def test_cnn_example_learns(tmp_path):
    result, events = run_example(
        "cnn.yaml", tmp_path, steps=300, eval_every=100, checkpoint_every=100
    )
    assert result.outcome == "succeeded"
    assert result.test_metrics["accuracy"] >= 0.7, result.test_metrics
    assert [e.step for e in events if e.kind == "checkpoint"] == [100, 200]


def test_lstm_example_finds_the_marker(tmp_path):
    result, _ = run_example("lstm_sequence.yaml", tmp_path)
    assert result.outcome == "succeeded" and result.test_metrics["accuracy"] >= 0.95


def test_attention_example_finds_the_marker(tmp_path):
    """The graph form: token and position embeddings, self-attention, a residual add."""
    result, _ = run_example("attention.yaml", tmp_path)
    assert result.outcome == "succeeded" and result.steps == 120
    assert result.test_metrics["accuracy"] >= 0.95, result.test_metrics


def test_cli_trains_a_job_file_and_reports(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepstream.cli",
            "train",
            str(EXAMPLES / "linear_regression.yaml"),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "linear-regression: succeeded after 200 steps" in out.stdout
    assert "200/200" in out.stderr and (tmp_path / "linear-regression" / "model.keras").is_file()


def test_cli_exit_codes_for_bad_and_failing_jobs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: nope\n")
    out = subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "loss.name" in out.stderr
    nan = tmp_path / "nan.yaml"
    nan.write_text(
        "model: linear\ndataset: {name: linear, noise: 10}\n"
        "optimizer: {name: sgd, learning_rate: 1.0e6}\n"
        "training: {steps: 100, batch_size: 100}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "train", str(nan), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "loss became" in out.stderr


def test_csv_example_trains_on_the_iris_file_scikit_learn_ships(tmp_path):
    import shutil
    from pathlib import Path

    import sklearn

    (tmp_path / "uploads").mkdir()
    iris = Path(sklearn.__file__).parent / "datasets" / "data" / "iris.csv"
    shutil.copy(iris, tmp_path / "uploads" / "iris.csv")  # as `trainer upload` keeps it
    spec = load_spec(EXAMPLES / "csv.yaml")
    events = []
    paths = DataPaths(data_dir=tmp_path, uploads=tmp_path / "uploads", download=False)
    result = train(spec, events.append, workdir=tmp_path / "work", paths=paths)
    assert result.outcome == "succeeded", result.failure
    assert result.final_eval["accuracy"] >= 0.9, result.final_eval


def test_resnet_example_a_keras_config_learns(tmp_path):
    # examples/resnet.py wrote resnet.json with JobSpec.from_keras; it must still be what it
    # writes (run `python examples/resnet.py` after changing it).
    import json
    import runpy

    job = runpy.run_path(str(EXAMPLES / "resnet.py"))["job"]
    assert json.loads((EXAMPLES / "resnet.json").read_text()) == json.loads(json.dumps(job()))
    result, _ = run_example("resnet.json", tmp_path, steps=150, eval_every=75)
    assert result.outcome == "succeeded"
    assert result.test_metrics["accuracy"] >= 0.6, result.test_metrics
