"""What a tenant may be called: one rule for `trainer token` and the server's tokens file.

A tenant's name becomes a folder of the artifact store (uploads/<tenant>/), so it is a single
plain path segment: ASCII letters, digits, '-' and '_', starting with a letter or digit.
"""

from __future__ import annotations

import re

MAX_TENANT_CHARS = 64  # the width of jobs.tenant
_TENANT = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_TENANT_CHARS - 1}}}")


def tenant_problem(name: str) -> str | None:
    """Why `name` cannot name a tenant, or None when it can."""
    if _TENANT.fullmatch(name):
        return None
    shown = name if len(name) <= MAX_TENANT_CHARS else f"{name[:MAX_TENANT_CHARS]}..."
    return (
        f"tenant {shown!r}: use 1 to {MAX_TENANT_CHARS} ASCII letters, digits, '-' and '_', "
        "starting with a letter or digit"
    )
