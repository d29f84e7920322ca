"""How much memory a job needs, from its spec alone, before anything is allocated; and how much
a worker has: its container's limit, not the node's.

Pure numpy and the standard library, no framework: the server estimates every job at submit.
The estimate follows engine.models (parameters of each layer kind, with their gradients and
optimizer slots), the activations of one batch kept for the backward pass, and the dataset's
arrays as engine.datasets and the trainer hold them (an uploaded .npz is sized from the .npy
headers in the zip, without decompressing an array).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import shutil
import subprocess
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine.shapes import Stack as _Stack
from stepstream_service.engine.shapes import layers as _layers
from stepstream_service.errors import DatasetInvalid

GiB = 2**30
MiB = 2**20
FLOAT = 4  # variables, their gradients and optimizer slots stay float32 under mixed precision
# Activations of one batch are kept for the backward pass, with their gradients and a working
# copy of the largest (as the trainer's earlier after-build check counted them).
ACTIVATION_COPIES = 3

# Optimizer slots per trainable parameter (engine.registry builds these Keras classes).
_SLOTS = {
    "adadelta": 2,
    "adagrad": 1,
    "adam": 2,
    "adamax": 2,
    "adamw": 2,
    "ftrl": 2,
    "lion": 1,
    "momentum": 1,
    "nadam": 2,
    "rmsprop": 1,
    "sgd": 0,
}
# Built-in image sets: (train, test) examples of 28 x 28 uint8 pixels, 10 classes.
_IMAGE_SETS = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000)}
# Bytes each generator holds per element of its training inputs while making them (its float64
# draws and float32 temporaries), beyond the result.
_GENERATOR_TEMPS = {
    "linear": 8,
    "synthetic_classification": 16,
    "synthetic_regression": 12,
    "synthetic_images": 20,
    "synthetic_sequence": 12,
}
_READ_CHUNK = 4 * MiB


def size(n: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever shows at least 1, with one decimal."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{max(n, 0) / 1024:.1f} KiB"


# ---------------------------------------------------------------- .npz headers


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{' x '.join(map(str, self.shape)) or 'scalar'} {self.dtype}"


# The arrays the npz loader (engine.datasets) reads: the first pair found of each group.
NPZ_INPUTS = (("x_train", "y_train"), ("x", "y"))
NPZ_EXPECTED = (
    "an .npz file (a zip of .npy arrays, as numpy.savez writes) holding x_train and y_train "
    "(or x and y), optionally x_test and y_test, as plain numeric arrays; or, for a keras "
    "config with several inputs or outputs, x_train:<input name> and y_train:<output name>"
)


def npz_arrays(source: Path | IO[bytes]) -> dict[str, ArrayInfo]:
    """Shape and dtype of every array in an .npz, read from the .npy headers in the zip, never
    decompressing an array. Raises DatasetInvalid saying what was found and what is expected;
    its messages name no server path."""
    out: dict[str, ArrayInfo] = {}
    try:
        with zipfile.ZipFile(source) as z:
            for member in z.infolist():
                name = member.filename
                if not name.endswith(".npy") or member.is_dir():
                    raise DatasetInvalid(
                        f"holds {_shown(name)}, which is not a .npy array; expected {NPZ_EXPECTED}"
                    )
                with z.open(member) as f:
                    info = _npy_header(f, name)
                header = member.file_size - info.nbytes
                if header < 0:
                    raise DatasetInvalid(
                        f"{_shown(name)} declares {info} ({size(info.nbytes)}) but holds "
                        f"{member.file_size:,} bytes: the file is cut short or corrupt"
                    )
                out[name.removesuffix(".npy")] = info
    except zipfile.BadZipFile:
        raise DatasetInvalid(f"not a zip archive; expected {NPZ_EXPECTED}") from None
    except (OSError, EOFError, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
        raise DatasetInvalid(
            f"cannot be read as a zip archive ({type(exc).__name__}); expected {NPZ_EXPECTED}"
        ) from None
    return out


def _npy_header(f: IO[bytes], name: str) -> ArrayInfo:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version}")
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise DatasetInvalid(
            f"{_shown(name)} is not a readable .npy array ({_first_line(exc)}); "
            f"expected {NPZ_EXPECTED}"
        ) from None
    if dtype.hasobject:
        raise DatasetInvalid(
            f"{_shown(name)} holds Python objects, which are never unpickled; "
            "expected plain numeric arrays"
        )
    return ArrayInfo(tuple(int(d) for d in shape), dtype)


def check_npz(arrays: dict[str, ArrayInfo], max_expanded: int) -> int:
    """Refuse what the npz loader would: no x_train/y_train (nor x/y), rows that differ, an
    empty set; and arrays that expand past `max_expanded` bytes (max_upload_expanded_bytes).
    Returns the expanded size."""
    expanded = sum(a.nbytes for a in arrays.values())
    if expanded > max_expanded:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(arrays.items())[:8])
        raise DatasetInvalid(
            f"its arrays expand to {size(expanded)} ({listed}), over this server's limit of "
            f"{size(max_expanded)} (max_upload_expanded_bytes)"
        )
    pair = next(((x, y) for x, y in NPZ_INPUTS if x in arrays and y in arrays), None)
    named = [k for k in arrays if k.startswith(("x_train:", "y_train:", "x:", "y:"))]
    if pair is None and {k[0] for k in named} == {"x", "y"}:
        rows = {k: arrays[k].shape[0] if arrays[k].shape else 0 for k in named}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            listed = ", ".join(f"{k} {n}" for k, n in sorted(rows.items())[:8])
            raise DatasetInvalid(f"its named training arrays' rows differ or are none ({listed})")
        return expanded
    if pair is None:
        found = ", ".join(sorted(arrays)[:8]) or "no arrays"
        raise DatasetInvalid(f"it holds {_shown(found)}; expected {NPZ_EXPECTED}")
    x, y = arrays[pair[0]], arrays[pair[1]]
    rows = [a.shape[0] if a.shape else 0 for a in (x, y)]
    if rows[0] != rows[1] or rows[0] == 0:
        raise DatasetInvalid(f"{pair[0]} has {rows[0]} rows but {pair[1]} has {rows[1]}")
    return expanded


def npz_token_max(source: Path, member: str) -> int:
    """The largest value in an integer array of an .npz, read a chunk at a time."""
    with zipfile.ZipFile(source) as z, z.open(f"{member}.npy") as f:
        info = _npy_header(f, member)
        top, left = 0, info.nbytes
        step = max(_READ_CHUNK // info.dtype.itemsize, 1) * info.dtype.itemsize
        while left > 0:
            chunk = f.read(min(step, left))
            if not chunk:
                break
            left -= len(chunk)
            values = np.frombuffer(
                chunk[: len(chunk) // info.dtype.itemsize * info.dtype.itemsize], dtype=info.dtype
            )
            if values.size:
                top = max(top, int(values.max()))
        return top


def local_npz(data_dir: Path, path: str | None) -> Path | None:
    """The uploaded file an npz job names, if it is one here: a key under data_dir/uploads
    that stays there once symlinks are followed; None otherwise (the loader says why)."""
    if not path:
        return None
    given = Path(path)
    if given.is_absolute() or ".." in given.parts:
        return None
    try:
        file = (data_dir / given).resolve()
        inside = file.is_relative_to((data_dir / "uploads").resolve())
        return file if inside and file.is_file() else None
    except (OSError, ValueError):
        return None


def _shown(text: str, limit: int = 100) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Footprint:
    """Peak bytes of one job, by part. `params` counts every model variable, as Keras's
    count_params() does."""

    params: int
    weights: int
    optimizer: int
    gradients: int
    activations: int
    data: int

    @property
    def model(self) -> int:
        """What lives on the training device: the model, its training state and one batch."""
        return self.weights + self.optimizer + self.gradients + self.activations

    @property
    def total(self) -> int:
        return self.model + self.data

    def describe(self) -> str:
        parts = ("weights", "optimizer", "gradients", "activations", "data")
        listed = ", ".join(f"{p} {size(getattr(self, p))}" for p in parts)
        return f"about {size(self.total)} ({listed}; {self.params:,} parameters)"


@dataclass(frozen=True)
class _Data:
    """The dataset as the loader makes it and as the job's model reads it."""

    raw: list[ArrayInfo]  # the loaded arrays, before shaping
    temps: int  # bytes a generator holds beyond its result while making the training inputs
    kind: str  # image | tabular | sequence
    task: str
    rows: int  # training examples
    test_rows: int
    example: tuple[int, ...]  # one raw input example's shape
    label_shape: tuple[int, ...]  # one raw label's shape
    num_classes: int | None
    vocab: int | None  # token ids' range, when the inputs are integer sequences


def estimate(
    spec: JobSpec, npz: dict[str, ArrayInfo] | None = None, npz_file: Path | None = None
) -> Footprint:
    """The job's peak memory, from its spec (and, for an npz dataset, its arrays' headers;
    without them the data part is left out). `npz_file` lets a token vocabulary be read."""
    data = _dataset(spec, npz, npz_file)
    if data is None:
        return _model_footprint(spec, None, 0)
    return _model_footprint(spec, data, _data_bytes(spec, data))


def _dataset(
    spec: JobSpec, npz: dict[str, ArrayInfo] | None, npz_file: Path | None
) -> _Data | None:
    ds = spec.dataset
    seed_n = {"linear": 100}.get(ds.name, 1000)
    n = ds.num_samples or seed_n
    nt = max(n // 5, 1)
    f32, i64, u8 = np.dtype("float32"), np.dtype("int64"), np.dtype("uint8")

    def pair(shape: tuple[int, ...], dtype, label: tuple[int, ...], ldtype) -> list[ArrayInfo]:
        return [
            ArrayInfo((n, *shape), np.dtype(dtype)),
            ArrayInfo((n, *label), np.dtype(ldtype)),
            ArrayInfo((nt, *shape), np.dtype(dtype)),
            ArrayInfo((nt, *label), np.dtype(ldtype)),
        ]

    if ds.name in _IMAGE_SETS:
        train, test = _IMAGE_SETS[ds.name]
        raw = [
            ArrayInfo((train, 28, 28), u8),
            ArrayInfo((train,), i64),
            ArrayInfo((test, 28, 28), u8),
            ArrayInfo((test,), i64),
        ]
        return _Data(raw, 0, "image", "classification", train, test, (28, 28), (), 10, None)
    temps = _GENERATOR_TEMPS.get(ds.name, 0)
    if ds.name == "linear":
        raw = pair((1,), f32, (1,), f32)
        return _Data(raw, temps * n, "tabular", "regression", n, nt, (1,), (1,), None, None)
    if ds.name == "synthetic_classification":
        f, k = ds.num_features or 20, ds.num_classes or 2
        raw = pair((f,), f32, (), i64)
        return _Data(raw, temps * n * f, "tabular", "classification", n, nt, (f,), (), k, None)
    if ds.name == "synthetic_regression":
        f = ds.num_features or 8
        raw = pair((f,), f32, (1,), f32)
        return _Data(raw, temps * n * f, "tabular", "regression", n, nt, (f,), (1,), None, None)
    if ds.name == "synthetic_images":
        k, s, c = ds.num_classes or 4, ds.image_size or 16, ds.channels or 1
        raw = pair((s, s, c), u8, (), i64)
        elems = n * s * s * c
        return _Data(raw, temps * elems, "image", "classification", n, nt, (s, s, c), (), k, None)
    if ds.name == "synthetic_sequence":
        k, length = ds.num_classes or 2, ds.sequence_length or 20
        if ds.vocab_size is not None:
            raw = pair((length,), "int32", (), i64)
            return _Data(
                raw,
                8 * n * length,
                "sequence",
                "classification",
                n,
                nt,
                (length,),
                (),
                k,
                ds.vocab_size,
            )
        f = ds.num_features or 1
        raw = pair((length, f), f32, (), i64)
        return _Data(
            raw,
            temps * n * length * f,
            "sequence",
            "classification",
            n,
            nt,
            (length, f),
            (),
            k,
            None,
        )
    if ds.name == "npz" and npz:
        return _npz_data(spec, npz, npz_file)
    if ds.name in _STREAMED:
        return _streamed_data(spec, npz_file)
    return None


# Batches a streamed dataset holds beyond its shuffle buffer: being read, prefetched, and the
# one training.
STREAM_BATCHES = 4
_STREAMED = ("csv", "parquet", "tfrecord", "image_folder")  # kernel.names.STREAMED


def _streamed_data(spec: JobSpec, file: Path | None) -> _Data:
    """A file dataset as streamed: what is held is its shuffle buffer and a few batches, never
    the files' size. With `stream: false` it is read whole into arrays: its rows then count,
    as many as a local file says (Parquet's metadata, a CSV's or TFRecord's size over its first
    rows', an image folder's listing). Unasked, the worker reads arrays only when they take a
    small share of its free memory, so the streamed estimate holds. Inputs per row from the
    spec, else from a local file's header; one when neither tells."""
    ds, f32, i64 = spec.dataset, np.dtype("float32"), np.dtype("int64")
    batch = spec.training.batch_size
    task = ds.task or ("classification" if ds.name == "image_folder" else "regression")
    classes = ds.num_classes or (2 if task == "classification" else None)
    whole = _file_rows(ds.name, file, ds) if ds.stream is False else None
    if ds.name == "image_folder":
        s, c = ds.image_size or 32, ds.channels or 3
        if whole:
            raw = [ArrayInfo((whole, s, s, c), np.dtype("uint8")), ArrayInfo((whole,), i64)]
            return _Data(raw, 0, "image", "classification", whole, 0, (s, s, c), (), classes, None)
        held = ArrayInfo((STREAM_BATCHES * batch, s, s, c), f32)  # file names are shuffled
        return _Data([held], 0, "image", "classification", 0, 0, (s, s, c), (), classes, None)
    if ds.name == "tfrecord":
        spec_ = ds.feature_spec or {}
        label = ds.label or (list(spec_)[-1] if spec_ else None)
        chosen = ds.features or [n for n in spec_ if n != label]
        width = sum(math.prod(spec_[n].shape) for n in chosen if n in spec_) or 1
    else:
        width = len(ds.features) if ds.features else max(_columns(ds.name, file, ds) - 1, 1)
    if whole:
        raw = [ArrayInfo((whole, width), f32), ArrayInfo((whole,), i64)]
        return _Data(raw, 0, "tabular", task, whole, 0, (width,), (), classes, None)
    rows = (ds.shuffle_buffer or 10_000) + STREAM_BATCHES * batch
    held = ArrayInfo((rows, width + 1), f32)
    return _Data([held], 0, "tabular", task, 0, 0, (width,), (), classes, None)


_SAMPLE = 1 << 20  # bytes of a CSV or TFRecord file read to size its rows


def _file_rows(name: str, file: Path | None, ds) -> int | None:
    """About how many examples a local dataset file holds; None when there is none here (a
    remote file: the loader reads it, and the worker's own memory check stands)."""
    if file is None:
        return None
    try:
        if name == "image_folder":
            suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # streams.IMAGE_EXTENSIONS
            if file.is_dir():
                return sum(1 for p in file.rglob("*") if p.suffix.lower() in suffixes)
            import tarfile

            with tarfile.open(file) as tar:
                return sum(1 for m in tar if m.isfile() and m.name.lower().endswith(suffixes))
        if name == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(file).metadata.num_rows)
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(_SAMPLE)
        if name == "tfrecord":
            first = 12 + int.from_bytes(head[:8], "little") + 4 if len(head) >= 12 else 0
            return size // first if first else None
        lines = head.count(b"\n") - 1  # less the header (or the line column_names replaces)
        return max(int(size / len(head) * lines), lines, 1) if head else None
    except Exception:  # an unreadable file is the loader's to explain
        return None


def _columns(name: str, file: Path | None, ds) -> int:
    """Columns in a local CSV or Parquet file (its header or schema); 1 when unknown."""
    if ds.column_names:
        return len(ds.column_names)
    if file is None:
        return 1
    try:
        if name == "parquet":
            import pyarrow.parquet as pq

            return len(pq.ParquetFile(file).schema_arrow.names)
        with file.open("r", encoding="utf-8", errors="replace") as f:
            return len(f.readline(1 << 20).split(","))
    except Exception:  # an unreadable file is the loader's to explain
        return 1


def _npz_data(spec: JobSpec, npz: dict[str, ArrayInfo], npz_file: Path | None) -> _Data | None:
    names_ = next(((x, y) for x, y in NPZ_INPUTS if x in npz and y in npz), None)
    if names_ is None:
        return None
    x, y = npz[names_[0]], npz[names_[1]]
    if not x.shape or not y.shape:
        return None
    xt = npz.get("x_test")
    integer = np.issubdtype(y.dtype, np.integer) and (len(y.shape) == 1 or y.shape[1:] == (1,))
    task = spec.dataset.task or ("classification" if integer else "regression")
    if len(x.shape) == 4 or (len(x.shape) == 3 and x.dtype == np.uint8):
        kind = "image"
    elif len(x.shape) == 3:
        kind = "sequence"
    else:
        kind = "tabular"
    tokens = kind != "image" and len(x.shape) == 2 and spec.model.architecture == "rnn"
    vocab = None
    if tokens and np.issubdtype(x.dtype, np.integer):
        vocab = 2
        if npz_file is not None:
            with contextlib.suppress(OSError, ValueError, zipfile.BadZipFile, DatasetInvalid):
                vocab = npz_token_max(npz_file, names_[0]) + 1
    # Classes come from the labels' values, which headers do not tell: the estimate takes
    # the smallest head, so it never refuses a job that fits.
    classes = 2 if task == "classification" else None
    return _Data(
        list(npz.values()),
        0,
        kind,
        task,
        x.shape[0],
        xt.shape[0] if xt is not None and xt.shape else 0,
        x.shape[1:],
        y.shape[1:],
        classes,
        vocab,
    )


def _tokens(spec: JobSpec, data: _Data) -> bool:
    return spec.dataset.tokens or (
        data.kind != "image" and len(data.example) == 1 and spec.model.architecture == "rnn"
    )


def _input_shape(spec: JobSpec, data: _Data) -> tuple[int, ...]:
    """One example as the model takes it (datasets.prepare's shaping)."""
    if _tokens(spec, data):
        return data.example
    arch = spec.model.architecture
    if data.kind == "image":
        shape = data.example if len(data.example) == 3 else (*data.example, 1)
        if arch == "rnn":
            return (shape[0], math.prod(shape[1:]))
        flatten = (
            spec.dataset.flatten
            if spec.dataset.flatten is not None
            else arch
            in (
                "mlp",
                "linear",
            )
        )
        return (math.prod(shape),) if flatten else shape
    return data.example


def _output_units(spec: JobSpec, data: _Data) -> int:
    if data.task == "regression":
        return max(math.prod(data.label_shape), 1)
    if spec.label_format == "binary" and data.num_classes == 2:
        return 1
    return int(data.num_classes or 1)


def _data_bytes(spec: JobSpec, data: _Data) -> int:
    """The arrays alive at once: the loaded ones, the shaped copies of them (a one-hot label
    is a row of floats), and the trainer's in-framework copy of the training split; or, while
    a generator runs, its temporaries."""
    raw = sum(a.nbytes for a in data.raw)
    per_input = math.prod(_input_shape(spec, data)) * FLOAT  # float32, or int32 token ids
    units = _output_units(spec, data)
    per_label = FLOAT if spec.label_format == "sparse" else units * FLOAT
    rows = data.rows + (data.test_rows if spec.dataset.evaluate_on_test else 0)
    shaped = rows * (per_input + per_label)
    train = data.rows * (per_input + per_label)
    # Image scaling makes one more float copy on the way; a validation split copies the rows.
    transient = train if data.kind == "image" or spec.dataset.validation_split > 0 else 0
    return raw + shaped + max(data.temps, train + transient)


# ---------------------------------------------------------------- the model, layer by layer


def _hidden(stack: _Stack, spec: JobSpec, units: Iterable[int]) -> None:
    m = spec.model
    for n in units:
        stack.dense(n)
        if m.batch_normalization:
            stack.batch_norm()
        if m.dropout:
            stack.dropout()


def _body(spec: JobSpec, data: _Data | None) -> _Stack:
    """models.ARCHITECTURES, on shapes. Without data (an npz not yet seen), one feature."""
    m = spec.model
    arch = m.architecture
    if data is None:
        shape: tuple[int, ...] = (1,)
        tokens, vocab = False, None
    else:
        shape = _input_shape(spec, data)
        tokens = _tokens(spec, data)
        vocab = data.vocab or spec.dataset.vocab_size
    stack = _Stack(shape)
    if arch in ("linear", "mlp") and len(stack.shape) > 1:
        stack.flatten()
    if arch == "mlp":
        _hidden(stack, spec, m.hidden_units)
    elif arch == "cnn":
        for filters in m.filters:
            stack.conv2d(filters, m.kernel_size, 1, "same")
            if m.batch_normalization:
                stack.batch_norm()
            if len(stack.shape) == 3 and min(stack.shape[:2]) >= 2 * m.pool_size:
                stack.max_pool(m.pool_size, None, "valid")
        stack.flatten()
        _hidden(stack, spec, m.dense_units)
    elif arch == "rnn":
        if tokens:
            stack.embedding(vocab or 2, m.embedding_dim)
        for i, units in enumerate(m.units):
            stack.rnn(m.cell, units, i < len(m.units) - 1, m.bidirectional)
        _hidden(stack, spec, m.dense_units)
    elif arch == "layers":
        _layers(stack, spec, vocab)
    return stack


def optimizer_slots(spec: JobSpec) -> int:
    o = spec.optimizer
    slots = _SLOTS.get(o.name, 2)
    if o.name == "sgd" and o.momentum:
        slots += 1
    if o.name == "rmsprop":
        slots += bool(o.momentum) + bool(o.centered)
    if o.name in ("adam", "adamw") and o.amsgrad:
        slots += 1
    return slots


def _model_footprint(spec: JobSpec, data: _Data | None, data_bytes: int) -> Footprint:
    if spec.model.architecture in ("backbone", "keras"):
        from stepstream_service.engine import config_footprint  # it builds on _Stack

        stack = config_footprint.body(spec, data)
    else:
        stack = _body(spec, data)
    if spec.model.architecture != "keras":  # a Keras config's outputs are its own
        stack.dense(_output_units(spec, data) if data is not None else 1)
    width = 2 if spec.runtime.precision.startswith("mixed") else 4
    batch = spec.training.batch_size
    # Evaluation runs forward only, in batches of at least 256 (trainer._evaluate).
    examples = max(ACTIVATION_COPIES * batch, max(batch, 256))
    # An optimizer update makes a few temporaries the size of the variable it updates.
    update = 2 * stack.largest * FLOAT
    return Footprint(
        params=stack.params,
        weights=stack.params * FLOAT,
        optimizer=optimizer_slots(spec) * stack.trainable * FLOAT + update,
        gradients=stack.trainable * FLOAT,
        activations=examples * stack.activations * width,
        data=data_bytes,
    )


# ---------------------------------------------------------------- what a worker has


@dataclass(frozen=True)
class Memory:
    """A memory limit, what of it is in use now (`used`) and by this process (`own`); `source`
    names where the limit comes from."""

    limit: int
    used: int
    own: int
    source: str

    @property
    def free(self) -> int:
        """What a job may still take now."""
        return max(self.limit - self.used, 0)

    @property
    def capacity(self) -> int:
        """What a job could take with nothing else running beside this process."""
        return max(self.limit - self.own, 0)


_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def host_limits(root: Path = Path("/")) -> list[Memory]:
    """Every limit this process lives under: the node's memory, its cgroup's (v2 memory.max up
    the tree, v1 hierarchical_memory_limit) and its address-space and data rlimits (prlimit
    --as / --data), each with its use now."""
    status = _kv(_read(root / "proc/self/status"))
    rss = status.get("VmRSS", 0)
    found = (
        _meminfo(root, rss),
        _cgroup_v2(root, rss),
        _cgroup_v1(root, rss),
        _rlimit(resource.RLIMIT_AS, status.get("VmSize", 0), "RLIMIT_AS"),
        _rlimit(resource.RLIMIT_DATA, status.get("VmData", 0), "RLIMIT_DATA"),
    )
    return [m for m in found if m is not None]


def headroom(root: Path = Path("/")) -> Memory | None:
    """The limit with the least left free now: what the next job must fit in."""
    found = host_limits(root)
    return min(found, key=lambda m: m.free) if found else None


def capacity(root: Path = Path("/")) -> Memory | None:
    """The limit that leaves this process the least room even when nothing else runs."""
    found = host_limits(root)
    return min(found, key=lambda m: m.capacity) if found else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def _meminfo(root: Path, rss: int) -> Memory | None:
    info = _kv(_read(root / "proc/meminfo"))
    if "MemTotal" not in info:
        return None
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return Memory(info["MemTotal"], info["MemTotal"] - available, rss, "the machine's memory")


def _cgroup_paths(root: Path) -> dict[str, str]:
    """controller ("" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def _candidates(mount: Path, path: str) -> list[Path]:
    """The process's cgroup folder and its parents up to the mount; the mount alone when the
    path is not there (a cgroup namespace shows the container's own cgroup at the mount)."""
    here = mount / path.lstrip("/")
    if path.strip("/") and here.is_dir():
        return [here, *(p for p in here.parents if p.is_relative_to(mount))]
    return [mount]


def _cgroup_v2(root: Path, rss: int) -> Memory | None:
    mount = root / "sys/fs/cgroup"
    if not (mount / "cgroup.controllers").is_file() or "" not in _cgroup_paths(root):
        return None
    best: Memory | None = None
    for folder in _candidates(mount, _cgroup_paths(root)[""]):
        text = (_read(folder / "memory.max") or "").strip()
        if not text.isdigit():
            continue
        current = (_read(folder / "memory.current") or "0").strip()
        inactive = _kv(_read(folder / "memory.stat")).get("inactive_file", 0)
        used = max(int(current) - inactive, 0) if current.isdigit() else 0
        m = Memory(int(text), used, rss, "the container's memory limit (cgroup memory.max)")
        if best is None or m.free < best.free:
            best = m
    return best


def _cgroup_v1(root: Path, rss: int) -> Memory | None:
    mount = root / "sys/fs/cgroup/memory"
    path = _cgroup_paths(root).get("memory")
    if path is None or not mount.is_dir():
        return None
    for folder in _candidates(mount, path):
        stat = _kv(_read(folder / "memory.stat"))
        limit = stat.get("hierarchical_memory_limit")
        if limit is None:
            text = (_read(folder / "memory.limit_in_bytes") or "").strip()
            limit = int(text) if text.isdigit() else None
        if limit is None:
            continue
        if limit >= _UNLIMITED:
            return None
        usage = (_read(folder / "memory.usage_in_bytes") or "0").strip()
        inactive = stat.get("total_inactive_file", 0)
        used = max(int(usage) - inactive, 0) if usage.isdigit() else 0
        source = "the container's memory limit (cgroup memory.limit_in_bytes)"
        return Memory(limit, used, rss, source)
    return None


def _rlimit(which: int, used: int, name: str) -> Memory | None:
    soft, _ = resource.getrlimit(which)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return Memory(soft, used, used, f"this process's {name} (prlimit)")


def gpu_memory() -> int | None:
    """The first visible GPU's memory in bytes, from nvidia-smi; None when it cannot tell."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    first = visible.split(",")[0].strip() if visible.strip() else "0"
    if not re.fullmatch(r"[\w-]+", first):
        return None
    try:
        out = subprocess.run(
            [tool, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", first],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(float(out.split()[0]) * MiB)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def worker_memory(gpus: int) -> int | None:
    """The figure a worker registers: what a job's footprint must fit in on it. On a GPU, the
    device's memory (the model and its batch live there); else the host's limit."""
    if gpus:
        found = gpu_memory()
        if found is not None:
            return found
    host = capacity()
    return host.capacity if host is not None else None
