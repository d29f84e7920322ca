"""The JSON Schema of a job spec, generated from `JobSpec`, the one validator.

Pydantic describes the mappings; this adds what its validators accept besides them: the names
each kind knows (so an editor completes and checks them) and the shorthands (`loss: mse` for
`loss: {name: mse}`). The repository keeps the result in schemas/job-spec.schema.json, which CI
regenerates and compares, and the server answers GetJobSpecSchema with it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec

SCHEMA_ID = "https://stepstream.dev/schemas/job-spec.schema.json"
# (model in $defs, property) -> the kind of name it holds.
_NAMED = {
    ("LossSpec", "name"): "loss",
    ("OptimizerSpec", "name"): "optimizer",
    ("ScheduleSpec", "name"): "schedule",
    ("DatasetSpec", "name"): "dataset",
    ("LayerSpec", "type"): "layer",
    ("LayerSpec", "activation"): "activation",
}
# JobSpec's (and OptimizerSpec's) properties that also take a bare name: property -> ($def, kind).
_SHORTHANDS = {
    ("JobSpec", "loss"): ("LossSpec", "loss"),
    ("JobSpec", "optimizer"): ("OptimizerSpec", "optimizer"),
    ("JobSpec", "dataset"): ("DatasetSpec", "dataset"),
    ("OptimizerSpec", "schedule"): ("ScheduleSpec", "schedule"),
}


def _names(kind: str) -> dict[str, Any]:
    return {"type": "string", "enum": names.valid_names(kind)}


def _name_or_null(prop: dict[str, Any], kind: str) -> None:
    """Make a string property (or string-or-null) hold a `kind` name."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "string":
            option["enum"] = names.valid_names(kind)


def job_spec_schema() -> dict[str, Any]:
    schema = copy.deepcopy(JobSpec.model_json_schema(mode="validation"))
    defs = schema["$defs"]
    models = {**defs, "JobSpec": schema}
    for (model, prop), kind in _NAMED.items():
        _name_or_null(models[model]["properties"][prop], kind)
    for model in defs.values():
        for prop in ("activation", "output_activation"):
            if prop in model.get("properties", {}):
                _name_or_null(model["properties"][prop], "activation")
    for (model, prop), (_, kind) in _SHORTHANDS.items():
        entry = models[model]["properties"][prop]
        options = entry.pop("anyOf", None) or [{"$ref": entry.pop("$ref")}]
        entry["anyOf"] = [_names(kind), *options]
    # The model: a mapping chosen by its architecture, or the architecture's name alone.
    model = schema["properties"]["model"]
    for ref in model["oneOf"]:
        arch = defs[ref["$ref"].rsplit("/", 1)[-1]]["properties"]["architecture"]
        arch.pop("const", None)
        arch["enum"] = [arch["default"]]
    variants = model.pop("oneOf")
    model.pop("discriminator", None)
    model["anyOf"] = [_names("architecture"), *variants]
    metrics = schema["properties"]["metrics"]
    metric = _names("metric")
    metrics["anyOf"] = [metric, {"type": "array", "items": metric}, {"type": "null"}]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "stepstream job spec"
    schema["minProperties"] = 1  # JobSpec.parse refuses an empty spec
    return schema


def schema_text() -> str:
    """The schema as the checked-in file holds it."""
    return json.dumps(job_spec_schema(), indent=2, sort_keys=True) + "\n"
