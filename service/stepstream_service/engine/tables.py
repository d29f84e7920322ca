"""CSV and Parquet datasets, read with pyarrow a block at a time: which columns are the inputs
and the label, the vocabularies of categorical columns and string labels (learned in one pass
over those columns only), and each block encoded as float32 inputs and labels. No TensorFlow:
engine.streams feeds these blocks to tf.data.

Missing numbers read as 0. A categorical value not seen in the training data gets a slot of
its own (the last), so validation and test files may hold values the training files lack.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from stepstream.kernel.spec import DatasetSpec
from stepstream_service.engine.sources import Files
from stepstream_service.errors import DatasetInvalid

CSV_BLOCK = 1 << 20  # bytes pyarrow parses at a time
PARQUET_ROWS = 8192  # rows per Parquet batch
LISTED = 12  # columns a message lists


def _pa():
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    return pa, pc, pcsv, pq


@dataclass
class Table:
    """How one dataset's columns become a model's inputs and labels."""

    spec: DatasetSpec
    format: str  # csv | parquet
    columns: list[str]
    features: list[str]
    label: str
    categorical: dict[str, list[str]] = field(default_factory=dict)  # column -> vocabulary
    task: str = "classification"
    classes: list[str] | None = None  # string labels' vocabulary, sorted
    num_classes: int | None = None
    rows: int = 0  # training rows, counted by the scan (0: not counted)
    held_out: int = 0  # of them, rows validation_split holds out

    @property
    def width(self) -> int:
        """Input features per example: one per numeric column, a one-hot per categorical."""
        return sum(
            len(self.categorical[c]) + 1 if c in self.categorical else 1 for c in self.features
        )

    def blocks(
        self, files: Files, need_label: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(inputs float32 [n, width], labels) a block at a time, in file order."""
        for batch in self._read(files, [*self.features, self.label]):
            yield self.encode(batch, files.shown)

    def count(self, files: Files) -> int:
        """Rows in `files`: Parquet's metadata, a CSV's label column read through."""
        _, _, _, pq = _pa()
        if self.format == "parquet":
            total = 0
            for file in files.files:
                with files.open(file) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            return total
        return sum(batch.num_rows for batch in self._read(files, [self.label]))

    def encode(self, batch, where: str) -> tuple[np.ndarray, np.ndarray]:
        pa, pc, _, _ = _pa()
        n = batch.num_rows
        parts = []
        for name in self.features:
            column = batch.column(name)
            if name in self.categorical:
                vocab = self.categorical[name]
                index = pc.index_in(pc.cast(column, pa.string()), value_set=pa.array(vocab))
                slots = pc.fill_null(index, len(vocab)).to_numpy(zero_copy_only=False)
                one_hot = np.zeros((n, len(vocab) + 1), np.float32)
                one_hot[np.arange(n), slots] = 1.0
                parts.append(one_hot)
            else:
                parts.append(_numbers(column, name, where)[:, None])
        x = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)
        return x, self._labels(batch.column(self.label), where)

    def _labels(self, column, where: str) -> np.ndarray:
        pa, pc, _, _ = _pa()
        if self.task == "regression":
            return _numbers(column, self.label, where)
        if self.classes is not None:
            index = pc.index_in(pc.cast(column, pa.string()), value_set=pa.array(self.classes))
            if index.null_count:
                raise DatasetInvalid(
                    f"{where}: label column {self.label!r} holds a class not in the training data"
                )
            return index.to_numpy(zero_copy_only=False).astype(np.int64)
        try:
            values = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DatasetInvalid(
                f"{where}: label column {self.label!r} must hold class numbers or names"
            ) from None
        if (
            self.num_classes is not None
            and len(values)
            and (values.min() < 0 or values.max() >= self.num_classes)
        ):
            raise DatasetInvalid(
                f"{where}: label column {self.label!r} holds {int(values.max())}, outside "
                f"0..{self.num_classes - 1} (dataset.num_classes)"
            )
        return values

    def _read(self, files: Files, columns: list[str]):
        """pyarrow record batches holding `columns`, every file in turn."""
        pa, _, pcsv, pq = _pa()
        for file in files.files:
            where = files.shown if len(files.files) == 1 else f"{files.shown} ({_tail(file)})"
            try:
                with files.open(file) as f:
                    if self.format == "parquet":
                        reader = pq.ParquetFile(f)
                        _check_columns(reader.schema_arrow.names, columns, where, self.spec)
                        yield from reader.iter_batches(PARQUET_ROWS, columns=columns)
                        continue
                    types = {c: pa.string() for c in (*self.categorical, self.label)}
                    if self.task == "regression":
                        types[self.label] = pa.float64()
                    types |= {c: pa.float64() for c in self.features if c not in self.categorical}
                    reader = pcsv.open_csv(
                        f,
                        read_options=_read_options(self.spec, self.columns),
                        convert_options=pcsv.ConvertOptions(
                            include_columns=columns, column_types=types
                        ),
                    )
                    yield from reader
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                text = _first_line(exc)
                if "conversion error" in text:
                    raise DatasetInvalid(
                        f"{where}: {text}; a column of non-numbers must be listed in "
                        "dataset.categorical, or left out of dataset.features"
                    ) from None
                raise DatasetInvalid(f"{where}: cannot be read ({text})") from None


def _numbers(column, name: str, where: str) -> np.ndarray:
    pa, pc, _, _ = _pa()
    try:
        column = pc.cast(column, pa.float32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DatasetInvalid(
            f"{where}: column {name!r} holds {column.type}, not numbers; list it in "
            "dataset.categorical, or leave it out of dataset.features"
        ) from None
    return pc.fill_null(column, 0.0).to_numpy(zero_copy_only=False)


def _read_options(spec: DatasetSpec, columns: list[str]):
    _, _, pcsv, _ = _pa()
    if spec.column_names:
        # The file's own first line is replaced by the names given.
        return pcsv.ReadOptions(column_names=columns, skip_rows=1, block_size=CSV_BLOCK)
    return pcsv.ReadOptions(block_size=CSV_BLOCK)


def _check_columns(have: list[str], wanted: list[str], where: str, spec: DatasetSpec) -> None:
    for name in wanted:
        if name not in have:
            field_ = (
                "label"
                if name == (spec.label or name) and name not in (spec.features or ())
                else "features"
            )
            if name in spec.categorical:
                field_ = "categorical"
            listed = ", ".join(have[:LISTED]) + (
                f" and {len(have) - LISTED} more" if len(have) > LISTED else ""
            )
            raise DatasetInvalid(
                f"dataset.{field_}: column {name!r} is not in {where}; it has: {listed}"
            )


def _tail(file: str) -> str:
    return file.rsplit("/", 1)[-1]


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def header(spec: DatasetSpec, fmt: str, files: Files) -> list[str]:
    """The column names of the first file (CSV: its first line, or column_names)."""
    pa, _, pcsv, pq = _pa()
    file = files.files[0]
    try:
        with files.open(file) as f:
            if fmt == "parquet":
                return list(pq.ParquetFile(f).schema_arrow.names)
            if spec.column_names:
                return list(spec.column_names)
            return list(
                pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK)).schema.names
            )
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        if "Empty CSV file" in str(exc) or "empty" in str(exc).lower():
            raise DatasetInvalid(f"{files.shown}: the file is empty") from None
        raise DatasetInvalid(
            f"{files.shown}: not a readable {fmt} file ({_first_line(exc)})"
        ) from None


def table(spec: DatasetSpec, fmt: str, files: Files, held_out) -> Table:
    """Columns from the spec and the first file; then one pass over the label and categorical
    columns only (the row count, vocabularies and classes), skipped where the spec says it all."""
    pa, pc, _, _ = _pa()
    columns = header(spec, fmt, files)
    label = spec.label or columns[-1]
    features = list(spec.features) if spec.features else [c for c in columns if c != label]
    if not features:
        raise DatasetInvalid(f"{files.shown}: no input columns beside the label {label!r}")
    _check_columns(columns, [*features, label], files.shown, spec)
    t = Table(spec, fmt, columns, features, label, {c: [] for c in spec.categorical})
    t.task = spec.task or "classification"
    t.num_classes = spec.num_classes
    if spec.task is None or t.task == "classification":
        t.task = _label_task(t, files) if spec.task is None else t.task
    classes: set = set()
    top = -1
    rows = held = 0
    scanned = [*spec.categorical, label]
    seen = {c: set() for c in spec.categorical}
    for batch in t._read(files, scanned):
        n = batch.num_rows
        if n == 0:
            continue
        mask = held_out(np.arange(rows, rows + n))
        rows += n
        held += int(mask.sum())
        for c in spec.categorical:
            seen[c].update(
                v
                for v in pc.unique(pc.cast(batch.column(c), pa.string())).to_pylist()
                if v is not None
            )
        if t.task == "classification":
            column = batch.column(label)
            if column.null_count:
                raise DatasetInvalid(f"{files.shown}: label column {label!r} has empty cells")
            if (
                t.classes is not None
                or pa.types.is_string(column.type)
                or pa.types.is_dictionary(column.type)
            ):
                values = pc.cast(column, pa.string())
                try:
                    top = max(top, int(pc.max(pc.cast(values, pa.int64())).as_py()))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    t.classes = []
                classes.update(pc.unique(values).to_pylist())
            else:
                top = max(top, int(pc.max(pc.cast(column, pa.int64())).as_py()))
    if rows == 0:
        raise DatasetInvalid(
            f"{files.shown}: no rows (the file is empty, or holds only its header)"
        )
    t.rows, t.held_out = rows, held
    t.categorical = {c: sorted(seen[c]) for c in spec.categorical}
    if t.task == "classification":
        if t.classes is not None:
            t.classes = sorted(classes)
            t.num_classes = t.num_classes or len(t.classes)
        elif t.num_classes is None:
            t.num_classes = max(top + 1, 2)
        if t.num_classes is not None and t.num_classes < 2:
            t.num_classes = 2
    next(t.blocks(files), None)  # the inputs' types, checked now rather than mid-training
    return t


def _label_task(t: Table, files: Files) -> str:
    """Classification for integer or string labels, regression for fractional ones: from the
    first block's label column."""
    pa, pc, _, _ = _pa()
    for batch in t._read(files, [t.label]):
        column = batch.column(t.label)
        if pa.types.is_floating(column.type):
            return "regression"
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                values = pc.cast(column, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return "classification"
            whole = pc.all(pc.equal(values, pc.floor(values))).as_py()
            return "classification" if whole in (True, None) else "regression"
        return "classification"
    return "classification"
