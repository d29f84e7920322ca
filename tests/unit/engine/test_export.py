"""Each export loaded with its own runtime (TensorFlow's SavedModel loader, onnxruntime, the
TFLite interpreter) predicts what Keras predicts on the same inputs, for an MLP and a CNN."""

from __future__ import annotations

import tarfile
import warnings

import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf

from stepstream_service.engine.export import ExportError, export, main

TOLERANCE = 1e-4


def mlp() -> keras.Model:
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


def cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.fixture(scope="module", params=[mlp, cnn], ids=["mlp", "cnn"])
def saved(request, tmp_path_factory):
    """A trained-looking model saved as .keras, some inputs, and Keras's predictions."""
    keras.utils.set_random_seed(1)
    model = request.param()
    path = tmp_path_factory.mktemp(request.param.__name__) / "model.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(4, *model.input_shape[1:])).astype("float32")
    return path, x, np.asarray(model.predict(x, verbose=0))


def test_saved_model_serves_keras_predictions(saved, tmp_path):
    path, x, expected = saved
    out = export(path, "saved_model", tmp_path / "saved_model.tar")
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "1")
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    serve = loaded.signatures["serving_default"]  # what TF Serving calls
    (name,) = serve.structured_input_signature[1]
    (got,) = serve(**{name: tf.constant(x)}).values()
    np.testing.assert_allclose(got.numpy(), expected, atol=TOLERANCE)


def test_onnx_runs_in_onnxruntime_with_keras_predictions(saved, tmp_path):
    path, x, expected = saved
    out = export(path, "onnx", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_tflite_runs_in_the_interpreter_with_keras_predictions(saved, tmp_path):
    path, x, expected = saved
    out = export(path, "tflite", tmp_path / "model.tflite")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated in favour of LiteRT's but still there
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(out))
    (given,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(given["index"], x.shape)  # the batch is dynamic
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_a_model_that_cannot_be_read_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="could not be exported to onnx"):
        export(bad, "onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    # The command the server runs says it on its last line of stderr, exit code 1.
    assert main([str(bad), "tflite", str(tmp_path / "model.tflite")]) == 1
    assert "could not be exported to tflite" in capsys.readouterr().err.strip().splitlines()[-1]
