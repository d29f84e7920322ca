"""Job and experiment files (YAML or JSON, `-` for stdin): read and validated, each problem
placed at its file, line and column."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from stepstream.cli.errors import EXIT_USAGE, CliError
from stepstream.kernel.experiment import ExperimentSpec, load_experiment
from stepstream.kernel.spec import JobSpec, Problem, SpecError


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """A problem of a job file, where it is: line and column count from 1 (0: not known)."""

    file: str
    field: str
    message: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        if self.field in ("", "<root>", "<file>"):
            return f"{where}: {self.message}"
        return f"{where}: {self.field}: {self.message}"


class SpecFileError(CliError):
    def __init__(self, problems: list[FileProblem]):
        super().__init__("\n".join(str(p) for p in problems), EXIT_USAGE)
        self.problems = problems


def locate(node: Any, field: str) -> tuple[int, int] | None:
    """(line, column), from 1, of the deepest key or item of YAML `node` on `field`'s path
    ("training.steps", "model.layers.2.units"); None when not even its first part is there."""
    import yaml

    where, parts, i = None, field.split("."), 0
    while i < len(parts):
        if isinstance(node, yaml.MappingNode):
            # A key may hold dots itself (an experiment's space.optimizer.learning_rate): the
            # longest key that the rest of the path starts with.
            keys = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
            for j in range(len(parts), i, -1):
                found = keys.get(".".join(parts[i:j]))
                if found is not None:
                    where, node, i = found[0].start_mark, found[1], j
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and parts[i].isdigit():
            if int(parts[i]) >= len(node.value):
                break
            node = node.value[int(parts[i])]
            where, i = node.start_mark, i + 1
        else:
            break
    return (where.line + 1, where.column + 1) if where is not None else None


def read_spec_file(
    path: str, stdin: TextIO | None = None, *, experiments: bool = False
) -> tuple[JobSpec | ExperimentSpec | None, list[FileProblem]]:
    """Parse and validate a job file (`-` for stdin): the spec, or every problem at its line.
    With `experiments`, a file with a `space:` is read as an experiment (its `job:` may name a
    job file beside it); without, such a file is refused, saying what it is."""
    import yaml

    name = "<stdin>" if path == "-" else path
    try:
        text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text("utf-8")
    except OSError as exc:
        return None, [FileProblem(name, "<file>", f"cannot read: {exc.strerror}")]
    except UnicodeDecodeError as exc:
        return None, [FileProblem(name, "<file>", f"not UTF-8 text: {exc.reason}")]
    node = None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, [
                FileProblem(name, "<file>", f"invalid JSON: {exc.msg}", exc.lineno, exc.colno)
            ]
        try:  # JSON is (nearly all) YAML: its nodes give the lines of the fields
            node = _compose(text, name)
        except yaml.YAMLError:
            node = None
    else:
        loader = yaml.SafeLoader(text)
        loader.name = name  # marks name the file, not "<unicode string>"
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = exc.problem or exc.context or "cannot be read"
            if exc.context and exc.problem:
                start = exc.context_mark
                at = f" that starts at line {start.line + 1}" if start else ""
                what = f"{exc.problem} ({exc.context}{at})"
            line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
            return None, [FileProblem(name, "<file>", f"invalid YAML: {what}", line, col)]
        except yaml.YAMLError as exc:
            return None, [FileProblem(name, "<file>", f"invalid YAML: {exc}")]
        finally:
            loader.dispose()
    experiment = isinstance(data, Mapping) and "space" in data
    try:
        if experiment and experiments:
            base = Path(".") if path == "-" else Path(path).parent
            return load_experiment(data, base_dir=base), []
        if experiment:
            what = "an experiment (it has space:), not a job: trainer experiment submit runs it"
            return None, [FileProblem(name, "<root>", what)]
        return JobSpec.parse(data if data is not None else {}), []
    except SpecError as exc:
        placed = [_placed(name, node, p) for p in exc.problems]
        return None, sorted(placed, key=lambda p: p.line)  # in the file's order


def _compose(text: str, name: str) -> Any:
    import yaml

    loader = yaml.SafeLoader(text)
    loader.name = name
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _placed(name: str, node: Any, problem: Problem) -> FileProblem:
    where = locate(node, problem.field) if node is not None and problem.field != "<root>" else None
    line, col = where or (0, 0)
    return FileProblem(name, problem.field, problem.message, line, col)


def load_spec_file(path: str) -> JobSpec:
    """The spec in a job file, or SpecFileError naming the file and line of every problem."""
    spec, problems = read_spec_file(path)
    if not isinstance(spec, JobSpec):
        raise SpecFileError(problems)
    return spec


def load_experiment_file(path: str) -> ExperimentSpec:
    """The experiment in a file, or SpecFileError naming the file and line of every problem."""
    spec, problems = read_spec_file(path, experiments=True)
    if isinstance(spec, JobSpec):
        name = "<stdin>" if path == "-" else path
        what = "a job, not an experiment: an experiment has space: (and the job under job:)"
        problems = [FileProblem(name, "<root>", what)]
    if not isinstance(spec, ExperimentSpec):
        raise SpecFileError(problems)
    return spec
