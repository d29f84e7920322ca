"""A trained model in the formats people deploy, converted the Keras 3 way (`model.export`):

  saved_model  a TensorFlow SavedModel (TF Serving's format; signature `serving_default`),
               sent as a tar of its folder (saved_model.pb, variables/, ...)
  onnx         ONNX (Keras drives tf2onnx), for onnxruntime and the many runtimes it feeds
  tflite       TensorFlow Lite / LiteRT flatbuffer, for phones and small devices

The worker exports what a job's `export` field asks for once it has succeeded; the API server,
which never imports TensorFlow, converts on demand by running this module in a subprocess:

    python -m stepstream_service.engine.export MODEL.keras FORMAT OUTPUT

It exits 0 with OUTPUT written, or 1 with the reason as the last line of stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from stepstream.kernel.spec import EXPORT_FORMATS

log = logging.getLogger(__name__)

# The artifact each format is kept as, beside model.keras under jobs/<job_id>/.
ARTIFACTS = {
    "keras": "model.keras",
    "saved_model": "exports/saved_model.tar",
    "onnx": "exports/model.onnx",
    "tflite": "exports/model.tflite",
}
FORMATS = ("keras", *EXPORT_FORMATS)
_KERAS_NAMES = {"saved_model": "tf_saved_model", "onnx": "onnx", "tflite": "litert"}


class ExportError(RuntimeError):
    """The model could not be converted; the message says to what and why."""

    reason = "export_failed"


def export(model_path: Path | str, fmt: str, output: Path | str) -> Path:
    """Convert the .keras model at `model_path` to `fmt`, written whole to the file `output`."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if not zipfile.is_zipfile(model_path):  # said before TensorFlow takes seconds to load
        raise ExportError(f"the model could not be exported to {fmt}: not a .keras file")
    import keras

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = keras.models.load_model(model_path, compile=False)
        _call_once(model)  # a model Keras loaded has never run, and some exporters refuse it
        with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
            target = Path(tmp) / "out"
            if fmt == "saved_model":
                model.export(str(target), format=_KERAS_NAMES[fmt], verbose=False)
                with tarfile.open(Path(tmp) / "out.tar", "w") as tar:
                    for entry in sorted(target.iterdir()):
                        tar.add(entry, arcname=entry.name)
                target = Path(tmp) / "out.tar"
            else:
                target = Path(tmp) / f"out.{fmt}"  # the exporters check the suffix
                with _quiet():
                    model.export(str(target), format=_KERAS_NAMES[fmt], verbose=False)
            os.replace(target, output)
    except ExportError:
        raise
    except Exception as exc:
        log.warning("export to %s failed", fmt, exc_info=True)
        raise ExportError(f"the model could not be exported to {fmt}: {_said(exc)}") from exc
    return output


def _call_once(model) -> None:
    import numpy as np

    inputs = [np.zeros((1, *(d or 1 for d in t.shape[1:])), t.dtype) for t in model.inputs]
    model(inputs if len(inputs) > 1 else inputs[0], training=False)


def _said(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet():
    # tf2onnx and the TFLite converter print progress to stdout; the worker's log has enough.
    with contextlib.redirect_stdout(sys.stderr):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepstream_service.engine.export")
    parser.add_argument("model", type=Path, help="a .keras model file")
    parser.add_argument("format", choices=EXPORT_FORMATS)
    parser.add_argument("output", type=Path, help="the file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        export(args.model, args.format, args.output)
    except ExportError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
