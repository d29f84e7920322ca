"""The client package never imports the service: a client-only install must work."""

from __future__ import annotations

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[3] / "client" / "stepstream"


def test_no_client_module_imports_the_service():
    offenders = []
    for path in sorted(CLIENT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.relative_to(CLIENT)}:{node.lineno} {m}"
                for m in modules
                if m.split(".")[0] in ("stepstream_service", "tensorflow", "keras")
            ]
    assert offenders == []
