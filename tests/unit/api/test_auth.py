"""Bearer tokens: the table follows its file or Secret folder, and never opens the door."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from stepstream_service.api.auth import (
    RECHECK_SECONDS,
    Auth,
    AuthConfigError,
    TokenTable,
    Unauthenticated,
    digest,
    new_token,
)

A, B = new_token(), new_token()


def line(tenant: str, token: str) -> str:
    return f"{tenant} {digest(token)}\n"


def replace(path: Path, text: str) -> None:
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.replace(path)


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def tick(self) -> float:
        self.now += RECHECK_SECONDS
        return self.now


def test_a_changed_file_is_read_again_at_the_next_check(tmp_path):
    file = tmp_path / "tokens"
    file.write_text(line("team-a", A) + line("team-b", B))
    table = TokenTable.load(file)
    assert (table.tenant(A), table.tenant(B)) == ("team-a", "team-b")
    replace(file, line("team-b", B))
    clock = Clock()
    table._checked = clock.now
    table.refresh(clock.now + RECHECK_SECONDS / 2)  # too soon: not looked at
    assert "team-a" in table.digests.values()
    table.refresh(clock.tick())
    assert table.digests == {digest(B): "team-b"}


def test_a_broken_or_missing_file_keeps_the_last_good_table(tmp_path, caplog):
    file = tmp_path / "tokens"
    file.write_text(line("team-a", A))
    table = TokenTable.load(file)
    clock = Clock()
    broken = ["team-a sha256:short\n", "", "\xff", None]
    for text in broken:
        if text is None:
            file.unlink()
        elif text == "\xff":
            file.write_bytes(b"team-a \xff\xfe\n")
        else:
            replace(file, text)
        with caplog.at_level(logging.ERROR, logger="stepstream_service.api.auth"):
            table.refresh(clock.tick())
        assert table.digests == {digest(A): "team-a"}, text
        assert "cannot be used" in caplog.text
        caplog.clear()
        table.refresh(clock.tick())  # the same broken file: not read, not logged again
        assert not caplog.text
    file.write_text(line("team-b", B))
    table.refresh(clock.tick())
    assert table.digests == {digest(B): "team-b"}


def test_a_kubernetes_secret_swap_is_seen(tmp_path):
    """A mounted Secret: files link into `..data`, which is swapped for a new folder."""
    secret = tmp_path / "secret"
    secret.mkdir()
    first = secret / "..2024_01"
    first.mkdir()
    (first / "tokens").write_text(line("team-a", A) + line("team-b", B))
    (secret / "..data").symlink_to(first.name)
    (secret / "tokens").symlink_to("..data/tokens")
    table = TokenTable.load(secret)
    assert set(table.digests.values()) == {"team-a", "team-b"}
    second = secret / "..2024_02"
    second.mkdir()
    (second / "tokens").write_text(line("team-b", B))
    (secret / "..data_tmp").symlink_to(second.name)
    os.replace(secret / "..data_tmp", secret / "..data")
    table.refresh(Clock().tick())
    assert table.digests == {digest(B): "team-b"}


class Context:
    def __init__(self, *metadata: tuple[str, str]):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def test_two_authorization_headers_are_refused(tmp_path):
    file = tmp_path / "tokens"
    file.write_text(line("team-a", A) + line("team-b", B))
    auth = Auth(TokenTable.load(file))
    assert auth.tenant_of(Context(("authorization", f"Bearer {A}"))) == "team-a"
    for pair in ((A, A), (A, B), (B, A)):
        headers = [("authorization", f"Bearer {t}") for t in pair]
        with pytest.raises(Unauthenticated, match="2 authorization headers"):
            auth.tenant_of(Context(*headers))


def test_a_file_without_tokens_is_refused_at_start(tmp_path):
    file = tmp_path / "tokens"
    file.write_text("# nobody yet\n")
    with pytest.raises(AuthConfigError, match="no tokens"):
        TokenTable.load(file)
