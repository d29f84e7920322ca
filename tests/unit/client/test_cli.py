"""The command line's pure parts: human times, output formats, naming jobs, job files' lines,
the progress line at 80 columns, gRPC error text, help; and the no-server hint (no server)."""

from __future__ import annotations

import io
import json
import math
import socket
import sys

import grpc
import pytest
import yaml

from stepstream import cli
from stepstream.cli.commands import build_parser
from stepstream.cli.completion import complete_jobs, complete_states
from stepstream.cli.errors import CliError, rpc_error_text
from stepstream.cli.names import match_jobs, resolve_job
from stepstream.cli.output import dump, human_age, human_duration, job_record, job_view, jobs_table
from stepstream.cli.progress import ProgressBar, print_event
from stepstream.cli.spec_files import read_spec_file
from stepstream.client import JobInfo
from stepstream.kernel.events import EvalEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.states import JobState

NOW = 1_800_000_000.0


def info(**changes) -> JobInfo:
    fields = {
        "name": "jobs/job-3f2a0c1b2d3e4f5a6b7c",
        "id": "job-3f2a0c1b2d3e4f5a6b7c",
        "display_name": "seed-mlp",
        "state": JobState.SUCCEEDED,
        "step": 5001,
        "total_steps": 5001,
        "loss": 0.1234,
        "accuracy": 0.9521,
        "mae": None,
        "attempts": 1,
        "max_attempts": 3,
        "priority": 0,
        "labels": {"team": "vision"},
        "test_metrics": {"accuracy": 0.9521},
        "model_available": True,
        "failure": None,
        "create_time": NOW - 180,
        "start_time": NOW - 179.5,
        "end_time": NOW - 60,
        "last_seq": 5020,
        "worker": "host-1-0",
        "spec": {"name": "seed-mlp", "model": {"architecture": "mlp"}, "loss": "mse"},
    }
    if "id" in changes and "name" not in changes:
        changes["name"] = f"jobs/{changes['id']}"
    return JobInfo(**{**fields, **changes})


# ---------------------------------------------------------------- human times


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.013, "13ms"),
        (4.25, "4.2s"),
        (42, "42s"),
        (192, "3m 12s"),
        (7500, "2h 5m"),
        (7200, "2h"),
        (3 * 86400 + 4 * 3600 + 59, "3d 4h"),
        (None, "-"),
        (math.nan, "-"),
    ],
)
def test_human_durations(seconds, text):
    assert human_duration(seconds) == text


def test_human_ages():
    assert human_age(NOW - 1, NOW) == "just now"
    assert human_age(NOW - 200, NOW) == "3m ago"
    assert human_age(NOW - 7500, NOW) == "2h ago"
    assert human_age(NOW - 3 * 86400, NOW) == "3d ago"
    assert human_age(NOW - 90 * 86400, NOW).count("-") == 2  # a date
    assert human_age(None, NOW) == "-"


# ---------------------------------------------------------------- output formats


def test_json_and_yaml_records_are_plain_data():
    failed = info(
        state=JobState.FAILED,
        loss=math.nan,
        failure=Failure("non_finite_loss", "loss became nan", 12),
        test_metrics={"loss": math.inf},
    )
    record = job_record(failed)
    text = dump(record, "json")  # allow_nan=False: a NaN would raise here
    back = json.loads(text)
    assert back["state"] == "FAILED" and back["loss"] is None
    assert back["failure"] == {
        "reason": "non_finite_loss",
        "message": "loss became nan",
        "step": 12,
    }
    assert back["create_time"] == "2027-01-15T07:57:00.000Z"
    assert back["run_seconds"] == pytest.approx(119.5)
    assert back["test_metrics"] == {"loss": None} and back["spec"]["loss"] == "mse"
    assert yaml.safe_load(dump(record, "yaml")) == back
    assert "JobState" not in text and "Failure(" not in text


def test_jobs_table_has_human_times_and_no_stray_values():
    queued = info(
        id="job-ffff0000111122223333",
        display_name="waiting",
        state=JobState.QUEUED,
        step=0,
        total_steps=0,
        loss=0.0,
        accuracy=None,
        start_time=None,
        end_time=None,
        create_time=NOW - 3,
    )
    regression = info(
        id="job-aaaa0000111122223333",
        display_name="linear",
        accuracy=None,
        mae=0.0123,
        start_time=NOW - 7600,
        end_time=NOW - 100,
        create_time=NOW - 7700,
    )
    lines = jobs_table([info(), queued, regression], now=NOW).splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "STATE", "STEP", "LOSS", "ACC", "MAE", "CREATED", "DURATION"
    ]  # fmt: skip
    assert lines[1].split() == [
        "job-3f2a0c1b2d3e4f5a6b7c", "seed-mlp", "SUCCEEDED", "5001/5001", "0.1234", "0.9521",
        "-", "3m", "ago", "1m", "59s",
    ]  # fmt: skip
    assert lines[2].split()[2:] == ["QUEUED", "0", "-", "-", "-", "just", "now", "-"]
    assert lines[3].split()[5:] == ["-", "0.0123", "2h", "ago", "2h", "5m"]
    assert len({len(line) for line in lines[:1]}) == 1


def test_show_as_a_table_reads_like_a_description():
    text = job_view(
        info(state=JobState.FAILED, failure=Failure("worker_lost", "gone", 40)), now=NOW
    )
    assert "State:    FAILED" in text
    assert "Failure:  worker_lost at step 40: gone" in text
    assert "Labels:   team=vision" in text and "(3m ago)" in text and "(queued 0.5s)" in text
    assert "Duration: 1m 59s" in text and "mlp, mse" in text


# ---------------------------------------------------------------- naming jobs


class FakeClient:
    def __init__(self, infos):
        self.infos, self.calls = infos, []

    def jobs(self, *, name=None, page_size=50, **_):
        self.calls.append(name)
        return iter([i for i in self.infos if name is None or i.display_name == name])


JOBS = [
    info(id="job-3f2a0c1b2d3e4f5a6b7c", display_name="seed-mlp"),
    info(id="job-3f2b999999999999aaaa", display_name="cnn"),
    info(id="job-77770000111122223333", display_name="twice"),
    info(id="job-88880000111122223333", display_name="twice"),
    info(id="job-99990000111122223333", display_name="3f2a"),
]


def test_a_full_id_is_used_as_is_without_a_call():
    client = FakeClient(JOBS)
    assert resolve_job(client, "job-0123456789abcdef0123") == "job-0123456789abcdef0123"
    assert resolve_job(client, "jobs/job-3f2a0c1b2d3e4f5a6b7c") == "job-3f2a0c1b2d3e4f5a6b7c"
    assert client.calls == []


def test_a_unique_prefix_or_name_names_its_job():
    assert resolve_job(FakeClient(JOBS), "3f2a0") == "job-3f2a0c1b2d3e4f5a6b7c"
    assert resolve_job(FakeClient(JOBS), "job-3f2b") == "job-3f2b999999999999aaaa"
    client = FakeClient(JOBS)
    assert resolve_job(client, "seed-mlp") == "job-3f2a0c1b2d3e4f5a6b7c"
    assert client.calls == ["seed-mlp"]  # not hex: ListJobs filters by name=


def test_ambiguous_and_unknown_names_are_errors_that_list_the_candidates():
    with pytest.raises(CliError) as caught:
        resolve_job(FakeClient(JOBS), "twice")
    assert caught.value.code == 2 and "'twice' names 2 jobs" in str(caught.value)
    assert "job-77770000111122223333" in str(caught.value)
    assert "job-88880000111122223333" in str(caught.value)
    # an id prefix and another job's display name
    with pytest.raises(CliError, match="'3f2a' names 2 jobs") as caught:
        resolve_job(FakeClient(JOBS), "3f2a")
    assert "job-99990000111122223333" in str(caught.value)
    assert "job-3f2a0c1b2d3e4f5a6b7c" in str(caught.value)
    with pytest.raises(CliError, match="no job has the id or the name 'nope'") as caught:
        resolve_job(FakeClient(JOBS), "nope")
    assert caught.value.code == 4


def test_match_jobs_counts_a_job_once():
    same = info(id="job-abcd0000111122223333", display_name="abcd")
    assert match_jobs("abcd", [same, same]) == [same]


# ---------------------------------------------------------------- job files


GOOD = """\
name: ok
model: {architecture: mlp, hidden_units: [16]}
dataset: {name: synthetic_classification, num_samples: 64}
training: {steps: 10, batch_size: 8}
"""

BAD = """\
# a comment
name: broken
loss: nope
model:
  architecture: mlp
  hidden_units: [10, -2]
training:
  steps: -3
  batch_size: 10
"""


def test_problems_name_the_file_and_the_line_of_their_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    spec, problems = read_spec_file(str(path))
    assert spec is None
    where = {p.field: (p.line, p.column) for p in problems}
    assert where["loss.name"] == (3, 1)  # `loss: nope` is shorthand: the key's line
    assert where["model.hidden_units.1"] == (6, 22)
    assert where["training.steps"] == (8, 3)
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    assert str(problems[0]).startswith(f"{path}:3:1: loss.name: unknown loss 'nope'")


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    _, problems = read_spec_file(str(path))
    (problem,) = problems
    assert str(problem).startswith(f"{path}:2:2: invalid YAML: expected ',' or ']'")
    assert "<unicode string>" not in str(problem)


def test_json_files_and_their_lines(tmp_path):
    path = tmp_path / "job.json"
    path.write_text('{"loss": "mse",\n "trainng": 3}')
    _, problems = read_spec_file(str(path))
    assert [str(p) for p in problems] == [f"{path}:2:2: trainng: unknown field"]
    path.write_text('{"loss": "mse",,}')
    _, problems = read_spec_file(str(path))
    assert str(problems[0]).startswith(f"{path}:1:16: invalid JSON")


def test_validate_reports_every_file_at_once(tmp_path, capsys, monkeypatch):
    good, bad, empty = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "empty.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    empty.write_text("")
    missing = tmp_path / "missing.yaml"
    code = cli.main(["validate", str(good), str(bad), str(empty), str(missing)])
    out, err = capsys.readouterr()
    assert code == 2
    assert (
        out
        == f"{good}: valid (mlp, sparse_categorical_crossentropy, adam, synthetic_classification)\n"
    )
    assert f"{bad}:3:1: loss.name" in err and f"{bad}:8:3: training.steps" in err
    assert f"{empty}: the spec is empty" in err
    assert f"{missing}: cannot read: No such file or directory" in err
    assert err.rstrip().endswith("3 of 4 files invalid")
    monkeypatch.setattr(sys, "stdin", io.StringIO(GOOD))
    assert cli.main(["validate", "-"]) == 0
    assert capsys.readouterr().out.startswith("<stdin>: valid")
    monkeypatch.setattr(sys, "stdin", io.StringIO(BAD))
    assert cli.main(["validate", "-", "-o", "json"]) == 2
    (report,) = json.loads(capsys.readouterr().out)
    assert report["file"] == "<stdin>" and not report["valid"]
    last = report["problems"][-1]
    assert (last["field"], last["line"], last["column"]) == ("training.steps", 8, 3)


# ---------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def replay(text: str, width: int = 80) -> list[str]:
    """What a terminal `width` columns wide shows after `text`; fails if a line would wrap."""
    assert "\x1b" not in text  # no cursor movement needed for one bar
    rows, row, col = [], [], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            rows.append("".join(row).rstrip())
            row, col = [], 0
        else:
            assert col < width, f"wraps at {width} columns: {''.join(row)!r}"
            if col < len(row):
                row[col] = ch
            else:
                row.append(ch)
            col += 1
    rows.append("".join(row).rstrip())
    return rows


def test_progress_fits_80_columns_and_leaves_nothing_stale():
    out = Terminal()
    bar = ProgressBar(2_000_000, "accuracy", out, width=80)
    bar.bar.mininterval = 0  # draw every update
    bar.update(10, 123456.789, 0.25, 3.5)  # a long line ...
    bar.update(1_999_990, 0.5, 0.99, 12345.0)  # ... a shorter one over it
    drawn = str(bar.bar)
    bar.close()
    screen = replay(out.getvalue(), 80)
    assert screen[-2] == drawn.rstrip() and screen[-1] == ""
    assert "1999990/2000000" in drawn and "loss 0.5000 acc 0.9900" in drawn
    assert "12,345 steps/s" in drawn and "<00:00" in drawn
    assert max(len(line) for line in screen) < 80


def test_progress_of_an_epoch_job_shrinks_cleanly_and_messages_go_above():
    out = Terminal()
    bar = ProgressBar(0, "mae", out, width=80)
    bar.bar.mininterval = 0
    bar.update(5, 1.0e9, 1.0e9, 2.0)
    print_event(EvalEvent(5, "validation", {"loss": 0.5}, 0.0), bar)
    bar.update(6, 0.5, 0.1, 2.0)
    bar.close()
    screen = replay(out.getvalue(), 80)
    assert "step 5 validation: loss 0.5000" in screen
    assert screen[-2].startswith("step 6 [") and screen[-2].endswith("loss 0.5000 mae 0.1000")
    assert "2.00 steps/s" in screen[-2]


def test_progress_is_plain_lines_without_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(200, "accuracy", out)
    for step in range(1, 201):
        bar.update(step, 0.5, 0.9, 1000.0)
    bar.write("job-x: SUCCEEDED")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "job-x: SUCCEEDED"  # no "0/200, ? steps/s" line before the first step
    assert "200/200" in lines[-1] and "loss 0.5000 acc 0.9000" in lines[-1]
    assert all(len(line) <= 80 for line in lines)


def test_progress_narrow_terminal_is_cut_not_wrapped():
    out = Terminal()
    bar = ProgressBar(5001, "accuracy", out, width=40)
    bar.bar.mininterval = 0
    bar.update(2500, 0.25, 0.5, 1500.0)
    bar.close()
    assert max(len(line) for line in replay(out.getvalue(), 40)) < 40


# ---------------------------------------------------------------- gRPC errors


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, status=None):
        self._code, self._details, self._status = code, details, status

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        if self._status is None:
            return ()
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def bad_request(message: str, violations: list[tuple[str, str]]) -> FakeRpcError:
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
    )
    status = status_pb2.Status(code=3, message=message, details=[detail])
    return FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, message, status)


def test_invalid_argument_prints_each_field_violation():
    exc = bad_request(
        "invalid job spec (2 problem(s)):\n  training.steps: over\n  model.units: too many",
        [("spec.training.steps", "over max_steps 1000"), ("spec.model.units", "too many")],
    )
    assert rpc_error_text(exc, "x:1").splitlines() == [
        "error: INVALID_ARGUMENT: invalid job spec (2 problem(s)):",
        "  spec.training.steps: over max_steps 1000",
        "  spec.model.units: too many",
    ]
    lone = bad_request("filter: cannot read 'x'", [("filter", "cannot read 'x'")])
    assert rpc_error_text(lone, "x:1") == "error: INVALID_ARGUMENT: filter: cannot read 'x'"


def test_other_errors_print_code_and_message():
    exc = FakeRpcError(grpc.StatusCode.NOT_FOUND, "job job-1 not found")
    assert rpc_error_text(exc, "x:1") == "error: NOT_FOUND: job job-1 not found"
    draining = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "the server is draining")
    assert rpc_error_text(draining, "x:1") == "error: UNAVAILABLE: the server is draining"
    refused = FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: Connection refused",
    )
    assert rpc_error_text(refused, "127.0.0.1:1") == (
        "error: no server answers at 127.0.0.1:1 (connection refused): start one with "
        "`trainer serve`, or pass --address / set TRAINER_ADDRESS"
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "command",
    [
        ["jobs"],
        ["jobs", "-o", "json"],
        ["show", "3f2a"],
        ["show", "seed-mlp", "-o", "table"],
        ["cancel", "job-0123456789abcdef0123"],
        ["watch", "job-0123456789abcdef0123"],
        ["download", "3f2a"],
        ["health"],
    ],
)
def test_no_server_is_one_clear_line(command, capsys):
    address = f"127.0.0.1:{closed_port()}"
    code = cli.main([*command, "--address", address])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    assert err.splitlines() == [
        f"error: no server answers at {address} (connection refused): start one with "
        "`trainer serve`, or pass --address / set TRAINER_ADDRESS"
    ]


# ---------------------------------------------------------------- help and completion


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:\n  trainer validate" in text and "Exit codes:" in text
    for command in ("submit", "jobs", "show", "watch", "validate", "cancel", "train", "serve"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert f"examples:\n  trainer {command}" in capsys.readouterr().out, command


def test_completion_scripts(capsys):
    try:
        import argcomplete  # noqa: F401
    except ImportError:
        assert cli.main(["completion", "bash"]) == 2
        assert "pip install argcomplete" in capsys.readouterr().err
        return
    for shell in ("bash", "zsh", "fish"):
        assert cli.main(["completion", shell]) == 0
        assert "trainer" in capsys.readouterr().out


def test_job_arguments_complete_from_the_server_quietly_when_none():
    args = build_parser().parse_args(["show", "x", "--address", f"127.0.0.1:{closed_port()}"])
    assert complete_jobs("", args) == []
    assert complete_states("ru") == ["RUNNING"]


def test_a_server_that_closes_the_connection_is_said_to_want_tls():
    from stepstream.connection import TLS_HINT, HintedRpcError

    closed = FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
        "Socket closed",
    )
    text = rpc_error_text(HintedRpcError(closed, TLS_HINT), "127.0.0.1:1")
    assert text == f"error: the server at 127.0.0.1:1 closed the connection at once: {TLS_HINT}"
    # Without the client's hint (a raw channel, as `trainer health` uses), still not "no server".
    assert "--tls" in rpc_error_text(closed, "127.0.0.1:1")
