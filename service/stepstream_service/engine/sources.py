"""Where a file dataset's data is: the files a path names (an upload's key, a glob of shards, an
fsspec URL), opened the same way whether local or remote. No TensorFlow.

A tenant's job reads only its uploads: a key under the uploads folder that stays there once
every symlink is followed. URLs (s3://, gs://, https://, file://) reach whatever the server's
credentials reach, so they are read only where DataPaths.urls allows it (a server without
tenants, or `trainer train` on one's own machine).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec

from stepstream_service.errors import DatasetInvalid, DatasetUnavailable

_SHOWN_PATH_CHARS = 200  # a path in a message is cut here: it echoes the tenant's input
_GLOB = set("*?[")
ARCHIVES = (".tar", ".zip")


def shown(given: str) -> str:
    return given if len(given) <= _SHOWN_PATH_CHARS else f"{given[:_SHOWN_PATH_CHARS]}..."


def is_url(given: str) -> bool:
    return "://" in given


@dataclass(frozen=True)
class Files:
    """The files one path names, sorted: local paths or URLs, with the name messages use."""

    files: tuple[str, ...]
    shown: str
    remote: bool  # read through fsspec, not the local file system

    def open(self, file: str) -> IO[bytes]:
        """A file opened for reading; compression (.gz, .bz2, ...) is undone on the way."""
        return fsspec.open(file, "rb", compression="infer").open()


def resolve(given: str, field: str, paths, folder: bool = False) -> Files:
    """The files `given` names, checked as DataPaths allows; `folder` for an image folder
    (a folder, or an archive of one). Raises DatasetUnavailable naming `field`."""
    what = shown(given)
    if is_url(given):
        if not paths.urls:
            raise DatasetUnavailable(
                f"dataset.{field} {what}: this server reads only uploads; send the data with "
                "`trainer upload` and use the path it returns"
            )
        fs, root = fsspec.core.url_to_fs(given)
        try:
            found = (
                sorted(fs.glob(root)) if _GLOB & set(root) else [root] if fs.exists(root) else []
            )
        except OSError as exc:
            raise DatasetUnavailable(f"dataset.{field} {what}: cannot be read ({exc})") from None
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        urls = tuple(f"{protocol}://{p}" if protocol != "file" else p for p in found)
        if not urls:
            raise DatasetUnavailable(f"dataset.{field} {what}: no such file")
        return Files(urls, what, protocol != "file")
    path = Path(given)
    if paths.data_dir is not None and not path.is_absolute():
        path = paths.data_dir / path  # there only, never the process's working directory
    if paths.uploads is not None and (Path(given).is_absolute() or ".." in Path(given).parts):
        raise DatasetUnavailable(_not_an_upload(field, what))
    try:
        found = sorted(glob.glob(str(path))) if _GLOB & set(given) else [str(path)]
        found = [f for f in found if os.path.exists(f)]
    except OSError:  # a name too long for the file system, say: no file by that name
        found = []
    if paths.uploads is not None and not all(_inside(Path(f), paths.uploads) for f in found):
        raise DatasetUnavailable(_not_an_upload(field, what))
    if not found:
        raise DatasetUnavailable(f"dataset.{field} {what}: no such file")
    if not folder and any(os.path.isdir(f) for f in found):
        raise DatasetInvalid(f"dataset.{field} {what}: a folder; name its files (dir/*.csv)")
    return Files(tuple(found), what, False)


def _inside(path: Path, uploads: Path) -> bool:
    """A file of the uploads folder that stays in its own folder once symlinks are followed,
    so a tenant's key reaches no other tenant's file."""
    folder = path.parent.resolve()
    return folder.is_relative_to(uploads.resolve()) and path.resolve().is_relative_to(folder)


def _not_an_upload(field: str, what: str) -> str:
    return (
        f"dataset.{field} {what}: not one of the uploads; a job reads only files sent with "
        "`trainer upload` (UploadDataset), by the path it returned"
    )


def fetch(artifacts, data_dir: Path, given: str | None) -> list[Path]:
    """An upload's files from the artifact store (a remote one: the worker's disk lacks them)
    to their place under `data_dir`: the key, or each file a glob of shards names (an image
    folder comes as one .tar). A copy of another size is fetched again (the upload was sent
    anew under its name). Returns the files fetched; URLs and absolute paths are left alone."""
    if not given or is_url(given) or Path(given).is_absolute() or ".." in Path(given).parts:
        return []
    folder, _, name = given.rpartition("/")
    if _GLOB & set(folder):
        return []  # shards live in one folder: the uploads of one tenant
    if _GLOB & set(name):
        held = artifacts.files(folder)
        wanted = {f"{folder}/{n}": size for n, size in held.items() if fnmatch.fnmatchcase(n, name)}
    elif artifacts.exists(given):
        wanted = {given: artifacts.size(given)}
    else:
        return []
    fetched = []
    for key, size in sorted(wanted.items()):
        local = data_dir / key
        if local.is_dir() or (local.is_file() and local.stat().st_size == size):
            continue
        artifacts.get(key, local)
        fetched.append(local)
    return fetched


def local_folder(files: Files, cache: Path | None) -> Path:
    """An image folder on local disk: the folder itself; an archive unpacked once beside it
    (or in `cache`); a remote folder copied into `cache`. Disk, not memory."""
    source = files.files[0]
    if not files.remote and os.path.isdir(source):
        return Path(source)
    name = Path(source.rstrip("/")).name
    if files.remote:
        if cache is None:
            raise DatasetUnavailable(f"{files.shown}: a remote folder needs a data directory")
        # The same folder in every process (hash() is salted per process).
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        target = cache / "remote" / f"{key}-{name}"
    else:
        # Named by the archive's size and time: an upload sent anew is unpacked anew.
        st = os.stat(source)
        target = Path(source).with_name(f".{name}.{st.st_size}-{st.st_mtime_ns}.d")
    done = target / ".complete"
    if done.is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if files.remote and not source.endswith(ARCHIVES):
            fs, root = fsspec.core.url_to_fs(source)
            fs.get(root.rstrip("/") + "/", str(partial), recursive=True)
        else:
            unpack(files.open(source) if files.remote else source, partial, files.shown)
        (partial / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def unpack(source, into: Path, what: str) -> None:
    """A .tar (or .zip) archive's plain files, refusing links and paths that leave `into`."""
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as z:
                for member in z.infolist():
                    if not member.is_dir():
                        target = (into / member.filename).resolve()
                        if not target.is_relative_to(into.resolve()):
                            raise DatasetInvalid(f"{what}: {member.filename!r} leaves the archive")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(member) as f, target.open("wb") as out:
                            shutil.copyfileobj(f, out)
            return
        if hasattr(source, "seek"):
            source.seek(0)
        named = {"fileobj": source} if hasattr(source, "read") else {"name": source}
        with tarfile.open(**named) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise DatasetInvalid(f"{what}: not a readable .tar or .zip archive ({exc})") from None
