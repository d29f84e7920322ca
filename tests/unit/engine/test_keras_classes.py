"""kernel.keras_classes against the installed Keras (a service dependency, so this lives with the
engine tests): the committed list of built-in Keras classes is the installed Keras's
(regenerate with scripts/gen-keras-classes.py after upgrading Keras)."""

from __future__ import annotations

import runpy
from pathlib import Path

from stepstream.kernel import keras_classes

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "gen-keras-classes.py"


def test_the_committed_classes_are_the_installed_keras_ones():
    generator = runpy.run_path(str(SCRIPT))
    found = {module: frozenset(names) for module, names in generator["classes"]().items()}
    assert found == keras_classes.CLASSES, "run scripts/gen-keras-classes.py"


def test_code_running_layers_are_never_allowed():
    layers = keras_classes.CLASSES["keras.layers"]
    assert {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer"} <= set(
        keras_classes.REFUSED_LAYERS
    )
    assert not layers & set(keras_classes.REFUSED_LAYERS)
    assert {"Conv2D", "Add", "Dense", "MultiHeadAttention", "InputLayer"} <= layers
