"""A Keras model config as a tenant's data: read it, refuse anything but built-in classes, and
read its graph (inputs, outputs, each layer's input shapes) without TensorFlow.

A config (`model.to_json()`, `keras.saving.serialize_keras_object(model)`) names classes that
Keras would import and instantiate. Every object in it is checked here, before anything is
deserialized: only the built-in layers, initializers, regularizers and constraints listed in
`keras_classes` pass; a Lambda, a custom or registered class, a function or bytecode is refused
with the layer's name and class. The service then loads it with Keras's safe mode as well.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepstream.kernel.keras_classes import CLASSES, REFUSED_LAYERS

# The whole-model classes a config may be: a functional graph or a Sequential stack.
MODEL_CLASSES = {
    ("keras", "Functional"),
    ("keras", "Sequential"),
    ("keras.models", "Functional"),
    ("keras.models", "Sequential"),
    ("keras.src.models.functional", "Functional"),
    ("keras.src.models.sequential", "Sequential"),
}
_DTYPE_POLICIES = {("keras", "DTypePolicy"), ("keras", "FloatDTypePolicy")}
# Markers Keras writes for values inside a config; every other "__x__" holds code or bytes.
_VALUE_MARKERS = {"__keras_tensor__", "__tuple__"}
# Keys that carry code, or ask the loader to look outside Keras.
_CODE_KEYS = {"function", "function_type", "custom_objects", "module_objects", "code"}
MAX_DEPTH = 64
_SHOWN = 64


class ConfigRefused(ValueError):
    """A model config that may not be loaded; the message names the layer and its class."""


Shape = tuple[int | None, ...]


@dataclass
class LayerInfo:
    name: str
    class_name: str
    config: dict[str, Any]
    inputs: list[str] = field(default_factory=list)  # the layers feeding it, in order
    input_shapes: list[Shape] = field(default_factory=list)  # one example's, batch left out


@dataclass
class Graph:
    """What the service needs of a config: its layers in order, its inputs and outputs."""

    kind: str  # Functional | Sequential
    layers: list[LayerInfo]
    inputs: list[tuple[str, Shape, str]]  # (layer name, example shape, dtype)
    outputs: list[str]  # output layer names

    def layer(self, name: str) -> LayerInfo | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def output_activation(self) -> str | None:
        """The activation the single output ends in, when the config says it plainly."""
        if len(self.outputs) != 1:
            return None
        layer = self.layer(self.outputs[0])
        for _ in range(len(self.layers)):
            if layer is None:
                return None
            c = layer.config
            if layer.class_name == "Softmax":
                return "softmax"
            if layer.class_name in ("Activation", "Dense", "EinsumDense") or "activation" in c:
                act = c.get("activation")
                return act if isinstance(act, str) else None
            if layer.class_name not in _PASS_THROUGH or len(layer.inputs) != 1:
                return None
            layer = self.layer(layer.inputs[0])
        return None


# Layers whose output's activation is their input's.
_PASS_THROUGH = {
    "ActivityRegularization",
    "AlphaDropout",
    "Dropout",
    "GaussianDropout",
    "GaussianNoise",
    "Identity",
    "Reshape",
    "Flatten",
}


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


# ---------------------------------------------------------------- reading


def read(source: Any) -> dict[str, Any]:
    """A config as a mapping, from a mapping, JSON text, a `keras.Model` (anything with
    `to_json()`, duck-typed so no TensorFlow is imported), or a .json/.keras file (only the
    config is read from a .keras archive; its weights are not used)."""
    if isinstance(source, Mapping):
        return dict(source)
    to_json = getattr(source, "to_json", None)
    if callable(to_json):
        return _parsed(to_json(), "model.to_json()")
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return _parsed(source, "the config")
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    return _parsed(z.read("config.json").decode(), f"{path} (config.json)")
            return _parsed(path.read_text(), str(path))
        except KeyError:
            raise ConfigRefused(f"{path} holds no config.json; is it a .keras file?") from None
        except OSError as exc:
            raise ConfigRefused(f"cannot read {path}: {exc.strerror or exc}") from None
    raise ConfigRefused(
        "a model config is a mapping, JSON text, a keras.Model or a .json/.keras file; "
        f"got {type(source).__name__}"
    )


def _parsed(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigRefused(f"{what} is not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(value, dict):
        raise ConfigRefused(f"{what} is not a JSON object but a {type(value).__name__}")
    return value


# ---------------------------------------------------------------- the safety walk


def check(config: Mapping[str, Any]) -> Graph:
    """Refuse every class that is not a built-in one (ConfigRefused naming the layer), then
    read the graph. `compile_config` is ignored: the job's loss and optimizer come from its
    spec."""
    top = (config.get("module"), config.get("class_name"))
    if top not in MODEL_CLASSES:
        raise ConfigRefused(
            f"the config is a {_shown(top[1])} from {_shown(top[0])}; expected a functional or "
            "Sequential model's config (model.to_json())"
        )
    _walk(config.get("config"), None, 0)
    return _graph(config)


def _walk(value: Any, layer: tuple[str, str] | None, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ConfigRefused(f"the config nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        for item in value:
            _walk(item, layer, depth + 1)
        return
    if not isinstance(value, dict):
        return
    where = _where(layer)
    for key in value:
        if key in _CODE_KEYS:
            raise ConfigRefused(f"{where}has a {_shown(key)} entry, which holds code")
    if "class_name" in value:
        layer = _object(value, layer)
        where = _where(layer)
    for key, item in value.items():
        if key == "compile_config":
            continue
        _walk(item, layer, depth + 1)


def _where(layer: tuple[str, str] | None) -> str:
    return f"layer {_shown(layer[0])} ({layer[1]}) " if layer else ""


def _object(obj: dict[str, Any], layer: tuple[str, str] | None) -> tuple[str, str] | None:
    """Check one serialized object; the layer it is (or the enclosing one) for messages."""
    cls, module, registered = obj.get("class_name"), obj.get("module"), obj.get("registered_name")
    if not isinstance(cls, str):
        raise ConfigRefused(f"{_where(layer)}has a class_name that is not a string")
    if cls.startswith("__") and cls.endswith("__"):
        if cls in _VALUE_MARKERS and module is None:
            return layer
        raise ConfigRefused(f"{_where(layer)}holds a {_shown(cls)} value: code or raw bytes")
    if cls == "function" or (module and str(module).startswith("builtins")):
        raise ConfigRefused(f"{_where(layer)}names a Python function ({_shown(obj.get('config'))})")
    name = obj.get("config", {}).get("name") if isinstance(obj.get("config"), dict) else None
    if module == "keras.layers":
        here = (str(name or obj.get("name") or "?"), cls)
        if cls in REFUSED_LAYERS:
            raise ConfigRefused(
                f"layer {_shown(here[0])} ({cls}) is refused: it {REFUSED_LAYERS[cls]}; "
                "a config may use built-in Keras layers only"
            )
        if cls not in CLASSES["keras.layers"]:
            raise ConfigRefused(
                f"layer {_shown(here[0])} ({_shown(cls)}) is not a built-in Keras layer; a "
                "config may use built-in Keras layers only"
            )
        _builtin(registered, cls, here)
        return here
    if module in CLASSES:
        if cls not in CLASSES[module]:
            raise ConfigRefused(
                f"{_where(layer)}names {_shown(cls)}, not a built-in {module} class"
            )
        _builtin(registered, cls, layer)
        return layer
    if (module, cls) in _DTYPE_POLICIES:
        _builtin(registered, cls, layer)
        return layer
    if (module, cls) in MODEL_CLASSES:
        return (str(name or "?"), cls)
    shown = f"{_shown(cls)} from module {_shown(module)}"
    if registered:
        shown += f" (registered as {_shown(registered)})"
    what = (
        f"layer {_shown(name)} ({_shown(cls)})" if name else _where(layer).strip() or "the config"
    )
    raise ConfigRefused(
        f"{what} names {shown}: a custom object; a config may use built-in Keras classes only"
    )


def _builtin(registered: Any, cls: str, layer: tuple[str, str] | None) -> None:
    # A registered name other than the class's own points the loader at a custom object.
    if registered not in (None, cls):
        raise ConfigRefused(
            f"{_where(layer)}names {_shown(cls)} registered as {_shown(registered)}: a custom "
            "object; a config may use built-in Keras classes only"
        )


# ---------------------------------------------------------------- the graph


def _graph(config: Mapping[str, Any]) -> Graph:
    body = config.get("config")
    if not isinstance(body, dict) or not isinstance(body.get("layers"), list):
        raise ConfigRefused("the config has no layers (config.layers)")
    if config.get("class_name") == "Sequential":
        return _sequential(body)
    return _functional(body)


def _shape(value: Any) -> Shape | None:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in value):
        return None
    return tuple(value[1:])


def _layer(raw: Any, i: int) -> LayerInfo:
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise ConfigRefused(f"config.layers.{i} is not a layer's config")
    cfg = raw["config"]
    name = str(raw.get("name") or cfg.get("name") or f"layer_{i}")
    info = LayerInfo(name, str(raw.get("class_name")), cfg)
    built = _shape((raw.get("build_config") or {}).get("input_shape"))
    if built is not None:
        info.input_shapes = [built]
    return info


def _input(layer: LayerInfo) -> tuple[str, Shape, str]:
    c = layer.config
    shape = _shape(c.get("batch_shape") or c.get("batch_input_shape"))
    if shape is None:
        raise ConfigRefused(f"input layer {_shown(layer.name)} has no batch_shape")
    return layer.name, shape, str(c.get("dtype") or "float32")


def _sequential(body: dict[str, Any]) -> Graph:
    layers = [_layer(raw, i) for i, raw in enumerate(body["layers"])]
    inputs = [_input(layer) for layer in layers if layer.class_name == "InputLayer"]
    if not inputs:
        shape = _shape(body.get("build_input_shape"))
        if shape is None:
            raise ConfigRefused(
                "the Sequential config has no input shape: build the model (keras.Input) first"
            )
        inputs = [("input", shape, "float32")]
    stack = [layer for layer in layers if layer.class_name != "InputLayer"]
    if not stack:
        raise ConfigRefused("the config has no layers besides its input")
    previous = inputs[0][0]
    for layer in stack:
        layer.inputs = [previous]
        previous = layer.name
    return Graph("Sequential", layers, inputs, [stack[-1].name])


def _tensors(value: Any, out: list[tuple[str, Shape | None]]) -> None:
    """Every keras tensor an inbound node refers to: (its layer, its shape)."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            cfg = value.get("config") or {}
            history = cfg.get("keras_history") or []
            if history and isinstance(history[0], str):
                shape = cfg.get("shape")
                out.append((history[0], _shape(shape) if shape else None))
            return
        for item in value.values():
            _tensors(item, out)
    elif isinstance(value, list):
        for item in value:
            _tensors(item, out)


def _refs(value: Any) -> list[str]:
    """Layer names of input_layers/output_layers: [name, 0, 0] or a list of them."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [value[0]]
    if isinstance(value, list):
        return [str(v[0]) for v in value if isinstance(v, list) and v]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _refs(v)]
    return []


def _functional(body: dict[str, Any]) -> Graph:
    layers = []
    for i, raw in enumerate(body["layers"]):
        layer = _layer(raw, i)
        found: list[tuple[str, Shape | None]] = []
        _tensors(raw.get("inbound_nodes"), found)
        layer.inputs = [name for name, _ in found]
        shapes = [shape for _, shape in found]
        if shapes and all(s is not None for s in shapes):
            layer.input_shapes = shapes  # type: ignore[assignment]
        layers.append(layer)
    by_name = {layer.name: layer for layer in layers}
    if len(by_name) != len(layers):
        raise ConfigRefused("two layers of the config share a name")
    inputs, outputs = _refs(body.get("input_layers")), _refs(body.get("output_layers"))
    for name in [*inputs, *outputs, *(n for layer in layers for n in layer.inputs)]:
        if name not in by_name:
            raise ConfigRefused(f"the config refers to a layer {_shown(name)} it does not have")
    if not inputs or not outputs:
        raise ConfigRefused("the config names no input_layers or no output_layers")
    return Graph("Functional", layers, [_input(by_name[n]) for n in inputs], outputs)
