"""Trained models, checkpoints and uploaded datasets, kept in one store addressed by a URL.

The store is a directory on the local disk by default (the data directory, so files the worker
writes there are already in place and nothing is copied) or any fsspec URL: `s3://bucket/prefix`
lets a worker on machine B resume a checkpoint that a worker on machine A wrote. Keys are
relative paths: `jobs/<job_id>/model.keras`, `jobs/<job_id>/checkpoints/...`,
`uploads/<name>.npz`.

Readers never see half an object: local writes go to a temporary file that is renamed into
place, object stores publish an object only when its upload completes, and other file systems
get a temporary key that is moved into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stepstream_service.errors import TrainerError

log = logging.getLogger(__name__)

# Checkpoints kept, here and in the trainer's workdir: the newest, and one to fall back on
# should the newest be unreadable.
KEEP_CHECKPOINTS = 2

# Protocols whose single PUT publishes an object whole, so no temporary key is needed (and a
# "move" there would be a copy of the whole object anyway).
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}

_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.keras$")


class ArtifactError(TrainerError):
    """An artifact could not be read or written; the message names its full URL."""

    reason = "artifact_error"


class ArtifactStore:
    """Files under one root URL; see the module docstring for the keys used."""

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        url = str(url)
        if "://" not in url:
            # A plain path: keep it a path in messages, but absolute so it does not depend on
            # the working directory of whoever reads it later.
            url = str(Path(url).expanduser().resolve())
        self.url: str = _strip_slash(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(options or {}))
        except (ImportError, ValueError) as exc:
            # ImportError: the URL's protocol needs a package that is not installed (s3fs...).
            raise ArtifactError(f"cannot open artifact store {self.url}: {exc}") from exc
        self._root: str = _strip_slash(root)
        self.local_root: Path | None = (
            Path(self._root) if isinstance(self.fs, LocalFileSystem) else None
        )
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._atomic_put = bool(_OBJECT_STORES & set(protocols))

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # ------------------------------------------------------------------------------- addressing

    def describe(self, key: str) -> str:
        """The full URL of `key`, for messages and logs."""
        return f"{self.url}/{_check_key(key)}"

    def local_path(self, key: str) -> Path | None:
        """Where `key` lives on this machine's disk, when the store is the local file system."""
        return None if self.local_root is None else self.local_root / _check_key(key)

    def _path(self, key: str) -> str:
        return f"{self._root}/{_check_key(key)}"

    def _fresh(self, key: str) -> str:
        """The store path of `key`, with any cached listing of it dropped: another machine may
        have written or deleted it since this process (fsspec caches file system instances,
        s3fs caches listings) last looked."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return path

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise ArtifactError(f"artifact not found: {self.describe(key)}") from exc
        except OSError as exc:
            raise ArtifactError(f"cannot {action} {self.describe(key)}: {exc}") from exc

    # ------------------------------------------------------------------------------ whole files

    def put(self, local: Path, key: str) -> None:
        """Upload the file `local` as `key`; nothing to do when it already is that file."""
        local = Path(local)
        if not local.is_file():
            raise ArtifactError(f"cannot upload {local} to {self.describe(key)}: no such file")
        target = self.local_path(key)
        if target is not None:
            if _same_file(local, target):
                return
            with self._errors("write", key):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = _temp_beside(target)
                try:
                    shutil.copyfile(local, tmp)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
            return
        path = self._fresh(key)
        with self._errors("write", key):
            if self._atomic_put:
                self.fs.put_file(str(local), path)
            else:
                tmp = _temp_beside_key(path)
                try:
                    self.fs.put_file(str(local), tmp)
                    self.fs.mv(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        self.fs.rm(tmp)
                    raise
        log.debug("uploaded %s to %s", local, self.describe(key))

    def get(self, key: str, local: Path) -> Path:
        """Download `key` to the file `local` and return `local`. The file appears whole or
        not at all; a missing key raises ArtifactError and leaves `local` as it was."""
        local = Path(local)
        source = self.local_path(key)
        if source is not None and _same_file(source, local):
            if not local.is_file():
                raise ArtifactError(f"artifact not found: {self.describe(key)}")
            return local
        path = self._fresh(key)
        with self._errors("read", key):
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_beside(local)
            try:
                if source is not None:
                    shutil.copyfile(source, tmp)
                else:
                    self.fs.get_file(path, str(tmp))
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        return local

    # ---------------------------------------------------------------------------------- streams

    def open(self, key: str, mode: str = "rb") -> IO[Any]:
        """A file object on `key`. Read modes stream from the store (read in chunks for large
        objects). Write modes collect the data and publish it on close(); leaving a `with`
        block by an exception publishes nothing."""
        if mode not in ("rb", "r", "wb", "w"):
            raise ValueError(f"unsupported mode {mode!r}: use rb, r, wb or w")
        if "w" in mode:
            return _Upload(self, key, text="b" not in mode)
        path = self._fresh(key)
        with self._errors("read", key):
            if self.local_root is not None:
                return open(path, mode)  # the caller closes it
            return self.fs.open(path, mode)

    def read_text(self, key: str) -> str:
        with self.open(key, "rb") as f, self._errors("read", key):
            return f.read().decode()

    def write_text(self, key: str, text: str) -> None:
        with self.open(key, "wb") as f:
            f.write(text.encode())

    # ------------------------------------------------------------------------------- inspection

    def exists(self, key: str) -> bool:
        path = self._fresh(key)
        with self._errors("check", key):
            return bool(self.fs.exists(path))

    def size(self, key: str) -> int:
        path = self._fresh(key)
        with self._errors("stat", key):
            return int(self.fs.size(path))

    def files(self, prefix: str) -> dict[str, int]:
        """Base name -> size of each file directly under `prefix`; none when it does not exist."""
        path = self._fresh(prefix)
        with self._errors("list", prefix):
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return {}
        return {
            str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }

    def usage(self, prefix: str) -> int:
        """Bytes of every file under `prefix`, however deep; 0 when there is none."""
        path = self._fresh(prefix)
        with self._errors("measure", prefix):
            try:
                return int(self.fs.du(path, total=True))
            except FileNotFoundError:
                return 0

    def delete(self, key: str) -> None:
        """Delete `key`, or everything under it when it is a prefix; missing is fine."""
        path = self._fresh(key)
        with self._errors("delete", key):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def _names(self, prefix: str) -> list[str]:
        """Base names of the entries directly under `prefix`; none when it does not exist."""
        path = self._fresh(prefix)
        with self._errors("list", prefix):
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        return [str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries]


class _Upload(io.RawIOBase):
    """A write-only file that becomes `key` on close(): spooled to a temporary file (beside the
    target on a local store, so publishing is a rename) and then put in one piece."""

    def __init__(self, store: ArtifactStore, key: str, text: bool = False):
        super().__init__()
        self._store, self._key, self._text = store, key, text
        target = store.local_path(key)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = _temp_beside(target)
        else:
            fd, name = tempfile.mkstemp(prefix="artifact-", suffix=".part")
            os.close(fd)
            self._tmp = Path(name)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._text:
            data = data.encode()
        return self._file.write(data)

    def abort(self) -> None:
        """Throw the data away; `key` is left as it was."""
        if not self.closed:
            try:
                self._file.close()
                self._tmp.unlink(missing_ok=True)
            finally:
                super().close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            target = self._store.local_path(self._key)
            if target is not None:
                with self._store._errors("write", self._key):
                    os.replace(self._tmp, target)
            else:
                self._store.put(self._tmp, self._key)
        finally:
            self._tmp.unlink(missing_ok=True)
            super().close()

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # io's default would close(), publishing whatever was written before the writer was
        # dropped; an upload nobody closed is an upload that did not finish.
        if not self.closed:
            log.warning("upload to %s dropped before close(); discarded", self._key)
            self.abort()


# ----------------------------------------------------------------------------------- checkpoints
#
# A checkpoint folder holds step-N.keras files (each renamed into place whole), beside each its
# sha256 in step-N.keras.sha256 (the `sha256sum` format, so `sha256sum -c` checks it by hand),
# and latest.json, the marker naming the newest with its step and sha256. A resume trusts none
# of them blindly: every step a file, a checksum or the marker names is a candidate, newest
# first, and the first whose file matches its recorded sha256 is used. Those passed over, and
# why, are said in the job's events (CheckpointScan.resumed_from).

MARKER = "latest.json"
_CHECKSUM_SUFFIX = ".sha256"
_CHECKSUM_NAME = re.compile(r"^step-(\d+)\.keras\.sha256$")
_PARTIAL_NAME = re.compile(r"^step-\d+\.partial\.keras$")  # see trainer._atomic_save
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.keras"


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_checkpoint(folder: Path, step: int) -> Path:
    """Seal the checkpoint of `step`, already in place in `folder`: its sha256 beside it, then
    the marker naming it, then checkpoints older than the newest KEEP_CHECKPOINTS go (with
    their checksums). Returns the checkpoint's path."""
    folder = Path(folder)
    path = folder / checkpoint_name(step)
    digest = sha256_of(path)
    _write_text_atomic(folder / f"{path.name}{_CHECKSUM_SUFFIX}", f"{digest}  {path.name}\n")
    _write_text_atomic(
        folder / MARKER, json.dumps({"step": step, "file": path.name, "sha256": digest})
    )
    kept = sorted(_steps_of(p.name for p in folder.iterdir()))[-KEEP_CHECKPOINTS:]
    for entry in folder.iterdir():
        found = _CHECKPOINT_NAME.match(entry.name) or _CHECKSUM_NAME.match(entry.name)
        old = found is not None and int(found[1]) not in kept
        if old or _PARTIAL_NAME.match(entry.name):  # a partial: a save a killed worker cut short
            entry.unlink(missing_ok=True)
    return path


class CheckpointScan:
    """The checkpoints of one folder, newest first, checked one by one as they are asked for;
    `problems` collects why each one passed over was not used."""

    def __init__(self, folder: Path, upto: int | None = None):
        self.folder = Path(folder)
        # A checkpoint past the last step whose events are stored would leave a hole in the
        # job's history (its worker died before writing them): one at or before it is used.
        self.upto = upto
        self.problems: list[str] = []
        self.marker: dict[str, Any] | None = None
        names = [p.name for p in self.folder.iterdir()] if self.folder.is_dir() else []
        steps = _steps_of(names)
        self.marker_seen = MARKER in names
        if self.marker_seen:
            try:
                info = json.loads((self.folder / MARKER).read_text())
                _checkpoint_file(info, MARKER)
                steps.add(int(info["step"]))
                self.marker = info
            except (OSError, ValueError, TypeError, ArtifactError):
                self.problems.append(f"the checkpoint marker {MARKER} is unreadable")
        self.steps: list[int] = sorted(steps, reverse=True)

    @property
    def existed(self) -> bool:
        """Whether any checkpoint was ever recorded here (usable or not)."""
        return bool(self.steps) or self.marker_seen

    def intact(self) -> Iterator[tuple[int, Path]]:
        """(step, path) of each checkpoint whose file matches its recorded sha256, newest
        first; each one found wanting on the way is added to `problems`."""
        for step in self.steps:
            if self.upto is not None and step > self.upto:
                self.passed_over(step, f"is past the last step stored ({self.upto})")
                continue
            why = self.check(step)
            if why is None:
                yield step, self.folder / checkpoint_name(step)
            else:
                self.passed_over(step, why)

    def newest_intact(self) -> int | None:
        return next((step for step, _ in self.intact()), None)

    def check(self, step: int) -> str | None:
        """None when the checkpoint of `step` is whole; otherwise what is wrong with it."""
        path = self.folder / checkpoint_name(step)
        if not path.is_file():
            return "is missing"
        expected = self._recorded(step)
        if expected is None:
            return "has no recorded sha256"
        if sha256_of(path) != expected:
            return "is damaged (sha256 mismatch)"
        return None

    def passed_over(self, step: int, why: str) -> None:
        self.problems.append(f"checkpoint at step {step} {why}")

    def resumed_from(self, step: int | None) -> str:
        """The sentence for the job's events: where training starts, and why there."""
        problems = "; ".join(self.problems)
        if step is None:
            return f"{problems}; no intact checkpoint is left, so training starts from step 0"
        said = f"resumed from checkpoint at step {step}"
        return f"{problems}; {said}" if problems else said

    def _recorded(self, step: int) -> str | None:
        name = checkpoint_name(step)
        try:
            text = (self.folder / f"{name}{_CHECKSUM_SUFFIX}").read_text()
            digest = text.split()[0] if text.split() else ""
        except (OSError, UnicodeDecodeError):
            digest = ""
        if not _SHA256.match(digest) and self.marker and self.marker.get("file") == name:
            digest = str(self.marker.get("sha256", ""))
        return digest if _SHA256.match(digest) else None


def push_checkpoint(store: ArtifactStore, workdir: Path, job_id: str) -> None:
    """Copy the newest checkpoint in `workdir` to the store, for a resume on any machine.

    The checkpoint file goes first, then its checksum, and the marker naming it last, so a
    reader never follows a marker to a missing file; remote checkpoints older than the newest
    KEEP_CHECKPOINTS go.
    """
    workdir = Path(workdir)
    if _is_home(store, workdir, job_id):
        return  # the trainer wrote straight into the store
    folder = workdir / "checkpoints"
    try:
        info = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return
    file = _checkpoint_file(info, folder / MARKER)
    prefix = f"jobs/{job_id}/checkpoints"
    store.put(folder / file, f"{prefix}/{file}")
    if (folder / f"{file}{_CHECKSUM_SUFFIX}").is_file():
        store.put(folder / f"{file}{_CHECKSUM_SUFFIX}", f"{prefix}/{file}{_CHECKSUM_SUFFIX}")
    # The marker as read, not re-read from disk: the trainer may have moved on meanwhile.
    store.write_text(f"{prefix}/{MARKER}", json.dumps(info))
    names = store._names(prefix)
    kept = set(sorted(_steps_of(names))[-KEEP_CHECKPOINTS:]) | {int(info["step"])}
    for name in names:
        found = _CHECKPOINT_NAME.match(name) or _CHECKSUM_NAME.match(name)
        if found and int(found[1]) not in kept:
            store.delete(f"{prefix}/{name}")
    log.info("checkpoint at step %s of job %s pushed to %s", info["step"], job_id, store.url)


def pull_checkpoint(
    store: ArtifactStore, workdir: Path, job_id: str, upto: int | None = None
) -> int | None:
    """Bring the store's checkpoints of `job_id` into `workdir` before resuming there.

    Remote checkpoints newer than the newest intact local one are fetched, newest first, until
    one matches its sha256; the remote marker comes too when it names a newer step, so the
    trainer's own scan sees (and says) what was found wanting. Returns the step of the newest
    intact checkpoint now in `workdir` (none past `upto`), or None when there is none.
    """
    workdir = Path(workdir)
    folder = workdir / "checkpoints"
    local = CheckpointScan(folder, upto).newest_intact()
    if _is_home(store, workdir, job_id):
        return local
    prefix = f"jobs/{job_id}/checkpoints"
    names = store._names(prefix)
    if not names:
        return local
    newest = local
    for step in sorted(_steps_of(names), reverse=True):
        if local is not None and step <= local:
            break
        if upto is not None and step > upto:
            continue
        name = checkpoint_name(step)
        try:
            for key in (name, f"{name}{_CHECKSUM_SUFFIX}"):
                if key in names and not (folder / key).is_file():
                    store.get(f"{prefix}/{key}", folder / key)
        except ArtifactError as exc:  # gone since listed: an older one may do
            log.warning("job %s: checkpoint at step %d not fetched: %s", job_id, step, exc)
            continue
        if CheckpointScan(folder, upto).check(step) is None:
            newest = step
            break
    if MARKER in names:
        _pull_marker(store, f"{prefix}/{MARKER}", folder)
    if newest is not None and newest != local:
        log.info("checkpoint at step %d of job %s pulled from %s", newest, job_id, store.url)
    return newest


def _pull_marker(store: ArtifactStore, key: str, folder: Path) -> None:
    """The remote marker, when it names a newer step than the local one (or there is none
    here): a marker that cannot be read or names a file outside the folder is never followed,
    but copied as it is, for the trainer to report."""
    text = store.read_text(key)
    try:
        info = json.loads(text)
        _checkpoint_file(info, store.describe(key))
        remote = int(info["step"])
    except (ValueError, TypeError, ArtifactError):
        remote = None
    here = CheckpointScan(folder)
    if here.marker_seen and (remote is None or (here.marker and here.marker["step"] >= remote)):
        return
    folder.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(folder / MARKER, text)


def _is_home(store: ArtifactStore, workdir: Path, job_id: str) -> bool:
    """Whether the job's folder in the store is `workdir` itself (the default layout)."""
    home = store.local_path(f"jobs/{job_id}")
    return home is not None and _same_file(home, workdir)


def _steps_of(names: Iterable[str]) -> set[int]:
    """The steps of the checkpoint files and checksums among `names`."""
    found = (_CHECKPOINT_NAME.match(n) or _CHECKSUM_NAME.match(n) for n in names)
    return {int(m[1]) for m in found if m}


def _checkpoint_file(info: Any, where: object) -> str:
    """The checkpoint file a marker names, refusing anything but a plain step-N.keras name (a
    marker from the store must not point a download outside the checkpoint folder)."""
    file = info.get("file") if isinstance(info, dict) else None
    if not isinstance(file, str) or not _CHECKPOINT_NAME.match(file) or "step" not in info:
        raise ArtifactError(f"checkpoint marker {where} is malformed: {str(info)[:200]!r}")
    return file


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- small helpers


def _strip_slash(url: str) -> str:
    """`url` without trailing slashes, but never down to nothing ("/" and "file:///" stay)."""
    scheme, sep, rest = url.rpartition("://")
    stripped = rest.rstrip("/")
    return f"{scheme}{sep}{stripped or rest[:1]}"


def _check_key(key: str) -> str:
    parts = str(key).strip("/").split("/")
    if not key or any(part in ("", ".", "..") for part in parts):
        raise ArtifactError(f"invalid artifact key {key!r}")
    return "/".join(parts)


def _same_file(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _temp_beside(path: Path) -> Path:
    """A temporary name in the same folder, so os.replace is a rename on one file system."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def _temp_beside_key(path: str) -> str:
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.part"


# ----------------------------------------------------------------------------------- folders


def push_folder(store: ArtifactStore, local: Path, key: str) -> int:
    """Copy each file directly in the folder `local` to `key/<name>`, for files a job writes
    as it runs (its TensorBoard events); nothing to do when `local` is that folder of the
    store already. Returns how many files were copied."""
    local = Path(local)
    target = store.local_path(key)
    if not local.is_dir() or (target is not None and _same_file(local, target)):
        return 0
    files = [p for p in sorted(local.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for path in files:
        store.put(path, f"{key}/{path.name}")
    return len(files)


def pull_folder(store: ArtifactStore, key: str, local: Path) -> int:
    """The reverse of push_folder: each file under `key` the folder `local` lacks, or has
    at another size. Returns how many files were fetched."""
    local = Path(local)
    source = store.local_path(key)
    if source is not None and _same_file(source, local):
        return 0
    fetched = 0
    for name, size in store.files(key).items():
        path = local / name
        if name.startswith(".") or (path.is_file() and path.stat().st_size == size):
            continue
        store.get(f"{key}/{name}", path)
        fetched += 1
    return fetched
