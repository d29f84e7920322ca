"""Shell completion through argcomplete: the script `trainer completion SHELL` prints, the
answer to a shell that asks (`_ARGCOMPLETE` set), and the completers of job, experiment and
state arguments."""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Any

from stepstream.cli.errors import CliError
from stepstream.cli.remote import credentials


def print_script(args: argparse.Namespace) -> int:
    try:
        import argcomplete
    except ImportError:
        raise CliError("shell completion needs argcomplete: pip install argcomplete") from None
    print(argcomplete.shellcode(["trainer"], shell=args.shell))
    return 0


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """When the shell asks for completions: answer, then exit (argcomplete exits)."""
    if "_ARGCOMPLETE" in os.environ:
        try:
            import argcomplete
        except ImportError:
            pass
        else:
            argcomplete.autocomplete(parser)


def complete_jobs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Tab completion of job arguments: the ids and names of recent jobs (quietly none when
    the server does not answer within a second or two)."""
    from stepstream.client import TrainingClient

    try:
        with TrainingClient(parsed_args.address, timeout=2, **credentials(parsed_args)) as c:
            infos = list(itertools.islice(c.jobs(page_size=200), 200))
    except Exception:
        return []
    words = {i.id for i in infos} | {i.display_name for i in infos}
    return sorted(w for w in words if w.startswith(prefix))


def complete_states(prefix: str, **_: Any) -> list[str]:
    from stepstream.kernel.states import JobState

    return [s.value for s in JobState if s.value.startswith(prefix.upper())]


def complete_experiments(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Tab completion of experiment arguments: the ids and names of recent experiments."""
    from stepstream.client import TrainingClient

    try:
        with TrainingClient(parsed_args.address, timeout=2, **credentials(parsed_args)) as c:
            infos = list(itertools.islice(c.experiments(page_size=200), 200))
    except Exception:
        return []
    words = {i.id for i in infos} | {i.display_name for i in infos}
    return sorted(w for w in words if w.startswith(prefix))


def complete_experiment_states(prefix: str, **_: Any) -> list[str]:
    from stepstream.kernel.states import ExperimentState

    return [s.value for s in ExperimentState if s.value.startswith(prefix.upper())]
