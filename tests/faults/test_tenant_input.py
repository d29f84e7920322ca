"""What a tenant sends that points outside its own space: dataset paths that name no upload, a
symlink out of the uploads folder, a path that exists only in the server's working directory,
tenant names that are paths, a plaintext client on a TLS server, and a tenant that fills the
disk. Each case checks that nothing was lost and that no job ran to completion twice.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from stepstream.client import TrainingClient
from tests.faults.conftest import assert_intact
from tests.faults.test_trust import failure, npz_job, serving
from tests.integration.test_service import classes

Code = grpc.StatusCode
QUOTA = 256 * 1024  # team-b fills it with one job; team-a stays far below it


def arrays(folder: Path, name: str = "d.npz") -> Path:
    """A small, valid npz dataset."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    path = folder / name
    np.savez(path, x=x, y=(x[:, 0] > 0).astype("int64"))
    return path


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    """The server's working directory: it holds a dataset at a path a tenant might name."""
    folder = tmp_path_factory.mktemp("server-cwd")
    (folder / "uploads" / "team-a").mkdir(parents=True)
    arrays(folder / "uploads" / "team-a", "here-only.npz")
    return folder


@pytest.fixture(scope="module")
def hosted(request, tmp_path_factory, tokens, cwd) -> Iterator:
    """Two tenants, one worker, a tiny storage quota; started in `cwd`."""
    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.chdir(cwd)  # the server process inherits it
        svc = stack.enter_context(
            serving(
                request,
                tmp_path_factory,
                "sqlite",
                workers=1,
                tokens_file=tokens.file,
                tenant_storage_bytes=QUOTA,
                storage_check_seconds=0.2,
            )
        )
        mp.undo()
        yield svc


def history(client: TrainingClient, name: str) -> list:
    return list(client.job(name).stream(retry_seconds=10))


def leaks(text: str, *folders: Path) -> list[str]:
    """Server paths that `text` shows."""
    return [str(f) for f in folders if str(f) in text]


# ---------------------------------------------------------------- (a) checked at submit


def test_a_dataset_path_that_names_no_upload_is_refused_at_submit(hosted, tokens, tmp_path):
    with TrainingClient(hosted.address, token=tokens.alice, timeout=30) as alice:
        before = {j.name for j in alice.jobs(page_size=1000)}
        err = failure(lambda: alice.submit(npz_job("uploads/team-a/never-sent.npz")))
        assert err.code() == Code.INVALID_ARGUMENT, err.details()
        assert "spec.dataset.path" in err.details() and "upload" in err.details()
        assert not leaks(err.details(), hosted.data_dir)
        path = alice.upload_dataset("sent", arrays(tmp_path))
        err = failure(lambda: alice.submit(npz_job("uploads/team-a/sent-not.npz")))
        assert err.code() == Code.INVALID_ARGUMENT and "sent.npz" in err.details()
        assert {j.name for j in alice.jobs(page_size=1000)} == before, "a refused job was made"
        job = alice.submit(npz_job(path))
        info = job.wait(timeout=120)
        assert info.state == "SUCCEEDED", info.failure
        assert_intact(history(alice, job.name), steps=20, final="SUCCEEDED")


def test_without_authentication_a_dataset_path_must_name_an_upload_too(
    request, tmp_path_factory, tmp_path
):
    with serving(request, tmp_path_factory, "sqlite") as svc:
        outside = arrays(tmp_path, "outside.npz")
        with TrainingClient(svc.address, timeout=30) as client:
            for path in ("uploads/never-sent.npz", str(outside), "outside.npz", "uploads/a/b.npz"):
                err = failure(lambda path=path: client.submit(npz_job(path)))
                assert err.code() == Code.INVALID_ARGUMENT, (path, err.details())
                assert "spec.dataset.path" in err.details(), err.details()
            assert list(client.jobs()) == [], "a refused job was made"
            path = client.upload_dataset("sent", outside)
            assert path == "uploads/sent.npz"
            job = client.submit(npz_job(path))
            assert job.cancel().state == "CANCELLED"
            assert_intact(history(client, job.name), final="CANCELLED")


# ---------------------------------------------------------------- (b) the worker stays in uploads


def test_a_symlink_out_of_the_uploads_folder_is_not_followed(hosted, tokens, tmp_path):
    secret = arrays(tmp_path, "secret.npz")
    folder = hosted.data_dir / "uploads" / "team-a"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "link.npz").symlink_to(secret)
    with TrainingClient(hosted.address, token=tokens.alice, timeout=30) as alice:
        job = alice.submit(npz_job("uploads/team-a/link.npz"))
        info = job.wait(timeout=120)
        assert info.state == "FAILED", "the job read a file outside the uploads folder"
        assert info.failure.reason == "dataset_unavailable", info.failure
        assert "uploads/team-a/link.npz" in info.failure.message
        assert not leaks(info.failure.message, tmp_path, hosted.data_dir), info.failure.message
        assert_intact(history(alice, job.name), final="FAILED")


def test_a_path_only_in_the_servers_working_directory_is_not_read(hosted, tokens, cwd):
    assert (cwd / "uploads" / "team-a" / "here-only.npz").is_file()
    with TrainingClient(hosted.address, token=tokens.alice, timeout=30) as alice:
        try:
            job = alice.submit(npz_job("uploads/team-a/here-only.npz"))
        except grpc.RpcError as err:  # refused at submit: it names no upload
            assert err.code() == Code.INVALID_ARGUMENT, err.details()
            assert not leaks(err.details(), cwd, hosted.data_dir)
            return
        info = job.wait(timeout=120)
        assert info.state == "FAILED", "the job read a file in the server's working directory"
        assert not leaks(info.failure.message, cwd, hosted.data_dir), info.failure.message
        assert_intact(history(alice, job.name), final="FAILED")


# ---------------------------------------------------------------- (c) tenant names


@pytest.mark.parametrize("name", ["../team-b", "a/b", "", "_team", "team b", "tëam", "x" * 65])
def test_trainer_token_refuses_a_tenant_name_the_server_would_refuse(name, tmp_path):
    from stepstream_service.api.auth import AuthConfigError, TokenTable, digest

    made = subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "token", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode != 0, f"a token was made for {name!r}:\n{made.stdout}"
    assert "tenant" in made.stderr and "letters, digits" in made.stderr, made.stderr
    assert "trn_" not in made.stdout  # no token was printed
    file = tmp_path / "tokens"
    file.write_text(f"{name} {digest('trn_x')}\n")
    with pytest.raises(AuthConfigError):
        TokenTable.load(file)


def test_trainer_token_and_the_server_agree_on_good_names(tmp_path):
    from stepstream_service.api.auth import TokenTable

    made = subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "token", "Team_9-b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip().splitlines()[-1]
    file = tmp_path / "tokens"
    file.write_text(line + "\n")
    assert set(TokenTable.load(file).digests.values()) == {"Team_9-b"}


# ---------------------------------------------------------------- (d) plaintext to TLS


def test_a_plaintext_client_on_a_tls_server_is_told_to_use_tls(tls_server, certs, tokens):
    with TrainingClient(tls_server.address, token=tokens.alice, timeout=10) as plain:
        err = failure(lambda: list(plain.jobs()))
    assert err.code() == Code.UNAVAILABLE
    assert "TLS" in err.details() and "tls=True" in err.details(), err.details()
    assert "TLS" in str(err), str(err)
    cli = subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "jobs", "--address", tls_server.address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRAINER_TOKEN": tokens.alice},
    )
    assert cli.returncode != 0
    assert "--tls" in cli.stderr and "--ca-cert" in cli.stderr, cli.stderr
    # Over TLS all is well, and the job's history is whole.
    with TrainingClient(tls_server.address, token=tokens.alice, ca_cert=certs.ca) as alice:
        job = alice.submit(classes(20, "after-hint"))
        assert job.cancel().state == "CANCELLED"
        assert_intact(history(alice, job.name), final="CANCELLED")


# ---------------------------------------------------------------- (e) storage quota


def test_a_tenant_over_its_storage_quota_is_stopped_and_refused(hosted, tokens, tmp_path):
    with (
        TrainingClient(hosted.address, token=tokens.bob, timeout=30) as bob,
        TrainingClient(hosted.address, token=tokens.alice, timeout=30) as alice,
    ):
        # Each step event is stored: this job writes far more than the quota.
        job = bob.submit(classes(100_000, "fills-the-disk"))
        info = job.wait(timeout=180)
        assert info.state == "FAILED", f"{info.state} after {info.step} steps"
        assert info.failure.reason == "storage_quota_exceeded", info.failure
        assert "tenant_storage_bytes" in info.failure.message, info.failure.message
        assert info.step < 100_000
        events = history(bob, job.name)
        assert_intact(events, final="FAILED")
        assert not [e for e in events if e.kind == "result" and e.outcome == "succeeded"]
        err = failure(lambda: bob.submit(classes(20, "one-more")))
        assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
        assert "tenant_storage_bytes" in err.details() and str(QUOTA) in err.details()
        err = failure(lambda: bob.upload_dataset("more", arrays(tmp_path)))
        assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
        assert "tenant_storage_bytes" in err.details()
        assert "one-more" not in {j.display_name for j in bob.jobs(page_size=1000)}
        # Another tenant is not held to bob's usage.
        other = alice.submit(classes(20, "still-fine"))
        assert other.wait(timeout=120).state == "SUCCEEDED"
        assert_intact(history(alice, other.name), steps=20, final="SUCCEEDED")
