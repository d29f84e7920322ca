"""api.convert: job names, filters, downsampling, spec hashes."""

from __future__ import annotations

import pytest

from stepstream.kernel.spec import JobSpec, SpecLimits
from stepstream.kernel.states import JobState
from stepstream_service.api import convert as api
from stepstream_service.api.errors import InvalidArgument


def test_job_names():
    assert api.job_id_of("jobs/job-abc123") == "job-abc123" == api.job_id_of("job-abc123")
    for bad in ("", "jobs/", "jobs/x", "job-XYZ", "jobs/job-1/../x"):
        with pytest.raises(InvalidArgument, match="is no job name") as caught:
            api.job_id_of(bad)
        assert caught.value.field == "name"


def test_filters():
    parsed = api.parse_filter("state=running label.team=vision AND name=seed")
    assert parsed == {"states": [JobState.RUNNING], "labels": {"team": "vision"}, "name": "seed"}
    assert api.parse_filter("state=JOB_STATE_QUEUED")["states"] == [JobState.QUEUED]
    with pytest.raises(InvalidArgument, match="valid: CANCELLED, CANCELLING, FAILED, QUEUED"):
        api.parse_filter("state=asleep")


@pytest.mark.parametrize(("n", "k"), [(0, 5), (3, 5), (100, 10), (5001, 7), (10, 1)])
def test_downsample_keeps_the_last_point_and_the_count(n, k):
    picked = api.downsample(n, k)
    assert len(picked) == min(n, k) and picked == sorted(set(picked))
    if n:
        assert picked[-1] == n - 1


def test_spec_hash_ignores_spelling_but_not_content():
    a = JobSpec.parse({"loss": "mse", "dataset": "linear", "model": "linear"})
    b = JobSpec.parse({"loss": "mean_squared_error", "dataset": "linear", "model": "linear"})
    c = JobSpec.parse({"loss": "mae", "dataset": "linear", "model": "linear"})
    assert api.spec_hash(a, 0, 3) == api.spec_hash(b, 0, 3) != api.spec_hash(c, 0, 3)
    assert api.spec_hash(a, 0, 3) != api.spec_hash(a, 1, 3)


def test_spec_json_problems_are_bad_arguments_naming_spec_json():
    limits = SpecLimits()
    for text, says in [
        ("", "required"),
        ("  ", "required"),
        ('{"dataset": ', "not valid JSON"),
        ('{"training": {"learning_rate": NaN}}', "NaN is no JSON number"),
    ]:
        with pytest.raises(InvalidArgument, match=says) as caught:
            api.spec_of(text, limits)
        assert caught.value.field == "spec_json"


def test_spec_json_keeps_integers_integers():
    spec = api.spec_of('{"dataset": "linear", "training": {"steps": 5001}}', SpecLimits())
    assert spec.to_dict()["training"]["steps"] == 5001
    assert isinstance(spec.to_dict()["training"]["steps"], int)


def test_a_spec_over_max_spec_bytes_is_refused_before_it_is_parsed():
    text = '{"name": "' + "n" * 200 + '"}'
    with pytest.raises(
        InvalidArgument, match=r"over this server's limit of 100 \(max_spec_bytes\)"
    ):
        api.spec_of(text, SpecLimits(), max_bytes=100)


def test_a_filter_is_bounded_and_never_echoed_whole():
    with pytest.raises(InvalidArgument, match="at most 2048 characters"):
        api.parse_filter("name=" + "x" * 3000)
    with pytest.raises(InvalidArgument) as caught:
        api.parse_filter("x" * 1000)
    assert len(str(caught.value)) < 300
