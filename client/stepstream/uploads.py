"""Resumable uploads, the client's half: what a file (or folder) is sent as, its sha256, and
the request stream from the offset the server already holds.

A folder (an image folder: one subfolder per class) is sent as a .tar made the same way every
time (sorted names, no times or owners), so an interrupted upload of it resumes too.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from stepstream.v1 import trainer_pb2 as pb

FORMATS = {
    ".npz": "npz",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
    ".tar": "tar",
    ".weights.h5": "weights",  # a backbone's weights (model.save_weights), not a dataset
}
Progress = Callable[[int], None]  # bytes just sent (or found already on the server)


def prepared(path: str | Path) -> tuple[Path, str]:
    """(the file to send, its format): a folder becomes a reproducible .tar beside the
    system's temporary files."""
    path = Path(path)
    if path.is_dir():
        return _tar_of(path), "tar"
    fmt = FORMATS.get(_suffix(path))
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise ValueError(f"{path}: cannot tell its format from {path.suffix!r}; one of {known}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path, fmt


def header(path: Path, fmt: str, name: str) -> pb.UploadHeader:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return pb.UploadHeader(
        name=name, format=fmt, size_bytes=path.stat().st_size, sha256=digest.hexdigest()
    )


def default_name(path: str | Path) -> str:
    """An upload's name from its file: the name without its extension."""
    p = Path(path)
    return p.name if p.is_dir() else p.name[: len(p.name) - len(_suffix(p))]


def _suffix(path: Path) -> str:
    """The extension a format is told by: .weights.h5 whole, else the last one."""
    if path.name.lower().endswith(".weights.h5"):
        return ".weights.h5"
    return path.suffix.lower()


def parts(
    h: pb.UploadHeader, path: Path, chunk_size: int, progress: Progress | None
) -> Iterator[pb.UploadDatasetRequest]:
    """UploadDataset's request stream: the header, then the file from h.offset in chunks."""
    yield pb.UploadDatasetRequest(header=h)
    with path.open("rb") as f:
        f.seek(h.offset)
        while chunk := f.read(chunk_size):
            yield pb.UploadDatasetRequest(chunk=chunk)
            if progress is not None:
                progress(len(chunk))


def _tar_of(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    listing = hashlib.sha256()
    for p in files:
        st = p.stat()
        listing.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    out = Path(tempfile.gettempdir()) / f"stepstream-{listing.hexdigest()[:24]}.tar"
    if out.is_file():
        return out
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o644 if info.isfile() else 0o755
        return info

    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(folder)), recursive=False, filter=plain)
    os.replace(partial, out)
    return out
