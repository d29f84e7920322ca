"""What an uploaded file must be, checked on arrival before it is kept: each dataset format
read as far as telling it is one (a header, a schema, record framing, an archive's listing),
never decoded whole; a backbone's weights file (Keras's .weights.h5) by its HDF5 signature
and top-level groups. No TensorFlow; messages name no server path.
"""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

from stepstream_service.engine import footprint
from stepstream_service.engine.streams import IMAGE_EXTENSIONS
from stepstream_service.errors import DatasetInvalid

# format -> the file name's extension on the server
FORMATS = {
    "npz": ".npz",
    "csv": ".csv",
    "parquet": ".parquet",
    "tfrecord": ".tfrecord",
    "tar": ".tar",
    "weights": ".weights.h5",
}
EXPECTED = {
    "csv": "a CSV file: a header line of column names (or none, with dataset.column_names), "
    "then rows of comma-separated values",
    "parquet": "a Parquet file (as pyarrow or pandas writes it) with at least one row",
    "tfrecord": "a TFRecord file of tf.train.Example records (as tf.io.TFRecordWriter writes)",
    "tar": "a .tar archive of an image folder: one subfolder per class, each holding images",
    "weights": "a Keras weights file, as model.save_weights('NAME.weights.h5') writes it "
    "(HDF5 with 'layers' and 'vars' groups)",
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The top-level groups Keras 3's save_weights writes (H5IOStore): the model's own variables
# and, for each layer that holds any, a group of its own under layers/.
_KERAS_WEIGHTS_GROUPS = ("layers", "vars")
_CSV_SAMPLE = 64 * 1024  # bytes of a CSV file read to check its shape


def check(path: Path, fmt: str, max_expanded: int) -> None:
    """Raise DatasetInvalid saying what was found and what is expected."""
    if fmt == "npz":
        footprint.check_npz(footprint.npz_arrays(path), max_expanded)
    elif fmt == "csv":
        _csv(path)
    elif fmt == "parquet":
        _parquet(path)
    elif fmt == "tfrecord":
        _tfrecord(path)
    elif fmt == "tar":
        _tar(path)
    elif fmt == "weights":
        _weights(path)
    else:
        raise DatasetInvalid(f"unknown format {fmt!r}; one of: {', '.join(sorted(FORMATS))}")


def _csv(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(_CSV_SAMPLE)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not a character cut at the sample's end
            raise DatasetInvalid(f"not UTF-8 text; expected {EXPECTED['csv']}") from None
        text = head[: exc.start].decode("utf-8")
    lines = text.splitlines()
    if len(head) == _CSV_SAMPLE and len(lines) > 1:
        lines = lines[:-1]  # the last line of the sample may be cut short
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise DatasetInvalid(f"holds {len(rows)} line(s); expected {EXPECTED['csv']}")
    # Rows agree with each other; the first line may not (a file whose header is replaced by
    # dataset.column_names, as scikit-learn's CSV files need).
    width = len(rows[1])
    if max(width, len(rows[0])) < 2:
        raise DatasetInvalid(f"its lines have one column; expected {EXPECTED['csv']}")
    for i, row in enumerate(rows[2:], start=3):
        if len(row) != width:
            raise DatasetInvalid(f"line {i} has {len(row)} values but line 2 has {width}")


def _parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(
            f"not a readable Parquet file ({str(exc)[:200]}); expected {EXPECTED['parquet']}"
        ) from None
    if meta.num_rows == 0:
        raise DatasetInvalid(f"holds no rows; expected {EXPECTED['parquet']}")


def _tfrecord(path: Path) -> None:
    """The framing, record by record (lengths only: a seek past each record)."""
    size = path.stat().st_size
    count = 0
    with path.open("rb") as f:
        at = 0
        while at < size:
            head = f.read(12)
            if len(head) < 12:
                raise DatasetInvalid(
                    f"cut short after {count} records; expected {EXPECTED['tfrecord']}"
                )
            n = int.from_bytes(head[:8], "little")
            at += 12 + n + 4
            if at > size:
                raise DatasetInvalid(
                    f"record {count + 1} declares {n} bytes, past the end of the file; expected "
                    f"{EXPECTED['tfrecord']}"
                )
            f.seek(at)
            count += 1
    if count == 0:
        raise DatasetInvalid(f"holds no records; expected {EXPECTED['tfrecord']}")


def _tar(path: Path) -> None:
    """Plain files and folders only, inside the archive; images in at least two class folders."""
    classes: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name
                if name.startswith("/") or ".." in Path(name).parts:
                    raise DatasetInvalid(f"{name[:100]!r} leaves the archive")
                if not (member.isfile() or member.isdir()):
                    raise DatasetInvalid(
                        f"{name[:100]!r} is a link or device; only files and folders"
                    )
                if member.isfile() and name.lower().endswith(IMAGE_EXTENSIONS):
                    parts = Path(name).parts
                    if len(parts) >= 2:
                        classes.add("/".join(parts[:-1]))
    except tarfile.TarError as exc:
        raise DatasetInvalid(
            f"not a readable .tar archive ({exc}); expected {EXPECTED['tar']}"
        ) from None
    if len(classes) < 2:
        raise DatasetInvalid(
            f"holds images in {len(classes)} folder(s); expected {EXPECTED['tar']}"
        )


def _weights(path: Path) -> None:
    """An HDF5 file (by its signature at offset 0, where h5py writes it) that h5py opens
    read-only, holding Keras's top-level groups; no weight is read."""
    import h5py

    with path.open("rb") as f:
        if f.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
            raise DatasetInvalid(f"not an HDF5 file; expected {EXPECTED['weights']}")
    try:
        with h5py.File(path, "r") as h5:
            groups = {k for k in h5 if isinstance(h5.get(k), h5py.Group)}
    except (OSError, ValueError, KeyError) as exc:  # KeyError: a link to nowhere
        raise DatasetInvalid(
            f"not a readable HDF5 file ({str(exc)[:200]}); expected {EXPECTED['weights']}"
        ) from None
    missing = [g for g in _KERAS_WEIGHTS_GROUPS if g not in groups]
    if missing:
        found = ", ".join(sorted(groups)[:10]) or "none"
        raise DatasetInvalid(
            f"has no {' or '.join(missing)} group (top-level groups: {found}); expected "
            f"{EXPECTED['weights']}"
        )
