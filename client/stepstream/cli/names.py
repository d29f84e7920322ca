"""Naming jobs and experiments on the command line: a full id, a unique id prefix, or a unique
display name."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from stepstream.cli.errors import EXIT_SERVER, CliError
from stepstream.cli.output import human_age, table

FULL_ID = re.compile(r"^(jobs/.+|job-[0-9a-f]{20})$")
_ID_PREFIX = re.compile(r"^(job-)?[0-9a-f]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
FULL_EXPERIMENT_ID = re.compile(r"^(experiments/.+|exp-[0-9a-f]{20})$")
_EXPERIMENT_PREFIX = re.compile(r"^(exp-)?[0-9a-f]+$")


def match_jobs(text: str, infos: Iterable[Any]) -> list[Any]:
    """The jobs whose id starts with `text` (with or without its 'job-') or whose display name
    is `text`, each once, in the order given."""
    return _matching(text, infos, "job-", _ID_PREFIX)


def match_experiments(text: str, infos: Iterable[Any]) -> list[Any]:
    """As match_jobs, for experiments (ids 'exp-...')."""
    return _matching(text, infos, "exp-", _EXPERIMENT_PREFIX)


def _matching(text: str, infos: Iterable[Any], kind: str, id_prefix: re.Pattern) -> list[Any]:
    prefix = text if text.startswith(kind) else f"{kind}{text}"
    id_like = bool(id_prefix.match(text))
    out, seen = [], set()
    for info in infos:
        if info.id in seen:
            continue
        if info.display_name == text or (id_like and info.id.startswith(prefix)):
            seen.add(info.id)
            out.append(info)
    return out


def resolve_job(client: Any, text: str) -> str:
    """The full id `text` names: a full id as is; else a unique id prefix or display name
    (found with ListJobs). None found, or several, is a CliError that lists them."""
    if FULL_ID.match(text):
        return text.removeprefix("jobs/")
    candidates: Iterable[Any] = []
    if _ID_PREFIX.match(text):  # every job: ListJobs cannot filter by id
        candidates = client.jobs(page_size=1000)
    elif _NAME.match(text):
        candidates = client.jobs(name=text, page_size=1000)
    found = match_jobs(text, candidates)
    if len(found) == 1:
        return found[0].id
    if not found:
        shown = text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"
        raise CliError(f"no job has the id or the name {shown!r} (see `trainer jobs`)", EXIT_SERVER)
    shown = found[:10]
    rows = [[j.id, j.display_name, str(j.state), human_age(j.create_time)] for j in shown]
    lines = table(["ID", "NAME", "STATE", "CREATED"], rows).splitlines()
    more = [f"... and {len(found) - len(shown)} more"] if len(found) > len(shown) else []
    listing = "\n".join(f"  {line}" for line in lines + more)
    raise CliError(f"{text!r} names {len(found)} jobs; give more of the id:\n{listing}")


def resolve_experiment(client: Any, text: str) -> str:
    """The full id `text` names, as resolve_job finds a job's (ListExperiments)."""
    if FULL_EXPERIMENT_ID.match(text):
        return text.removeprefix("experiments/")
    candidates: Iterable[Any] = []
    if _EXPERIMENT_PREFIX.match(text):
        candidates = client.experiments(page_size=1000)
    elif _NAME.match(text):
        candidates = client.experiments(name=text, page_size=1000)
    found = match_experiments(text, candidates)
    if len(found) == 1:
        return found[0].id
    if not found:
        shown = text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"
        raise CliError(
            f"no experiment has the id or the name {shown!r} (see `trainer experiment list`)",
            EXIT_SERVER,
        )
    shown = found[:10]
    rows = [[e.id, e.display_name, str(e.state), human_age(e.create_time)] for e in shown]
    lines = table(["ID", "NAME", "STATE", "CREATED"], rows).splitlines()
    more = [f"... and {len(found) - len(shown)} more"] if len(found) > len(shown) else []
    listing = "\n".join(f"  {line}" for line in lines + more)
    raise CliError(f"{text!r} names {len(found)} experiments; give more of the id:\n{listing}")
