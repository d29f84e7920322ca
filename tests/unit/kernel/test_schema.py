"""The published JSON Schema of a job spec: current, valid, and in step with JobSpec."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from stepstream.kernel.schema import job_spec_schema, schema_text
from stepstream.kernel.spec import JobSpec, SpecError

ROOT = Path(__file__).resolve().parents[3]
CHECKED_IN = ROOT / "schemas" / "job-spec.schema.json"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = job_spec_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_checked_in_schema_is_current():
    assert CHECKED_IN.read_text() == schema_text(), "run scripts/gen-schema"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_passes_and_names_the_schema(validator, path):
    text = path.read_text()
    assert "# yaml-language-server: $schema=../schemas/job-spec.schema.json" in text
    data = yaml.safe_load(text)
    assert list(validator.iter_errors(data)) == []
    JobSpec.parse(data)


def _properties(schema: dict, node: dict) -> set[str]:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return set(node.get("properties", {}))


def test_the_schema_and_the_model_describe_the_same_fields():
    schema = job_spec_schema()
    assert set(schema["properties"]) == set(JobSpec.model_fields)
    for name, field in JobSpec.model_fields.items():
        model = field.annotation
        options = [o for o in schema["properties"][name].get("anyOf", []) if "$ref" in o]
        for option in options:
            target = schema["$defs"][option["$ref"].rsplit("/", 1)[-1]]
            fields = getattr(model, "model_fields", None)
            if fields is not None:
                assert set(target["properties"]) == set(fields), name


@pytest.mark.parametrize(
    "spec",
    [
        {"model": "linear", "loss": "mse", "dataset": "linear", "optimizer": "sgd"},
        {"model": {"architecture": "mlp", "hidden_units": [8]}, "dataset": {"name": "mnist"}},
        {
            "dataset": "linear",
            "metrics": "mae",
            "optimizer": {"name": "adam", "schedule": "cosine_decay"},
        },
    ],
)
def test_shorthands_pass_both(validator, spec):
    assert list(validator.iter_errors(spec)) == []


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"modle": "mlp"},
        {"loss": "nope"},
        {"model": "transformer"},
        {"training": {"steps": 1.5}},
    ],
)
def test_what_the_schema_refuses_the_model_refuses(validator, spec):
    assert list(validator.iter_errors(spec))
    with pytest.raises(SpecError):
        JobSpec.parse(spec)
