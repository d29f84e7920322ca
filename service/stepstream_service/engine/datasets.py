"""Datasets by name: where to find them, how to make them, and how to shape them for a job.

Real datasets are looked up in the data directory, the Keras cache and /usr/share/datasets
(Debian's dataset packages) before any download, and a machine with none of them and no network
gets an error that says every place it looked.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepstream.kernel import names
from stepstream.kernel.spec import DatasetSpec, JobSpec
from stepstream_service.engine import streams
from stepstream_service.engine.registry import Registry
from stepstream_service.errors import DatasetInvalid, DatasetUnavailable


@dataclass(frozen=True)
class DataPaths:
    """Where datasets are looked for, in order; `download` allows Keras's download last."""

    data_dir: Path | None = None
    keras_home: Path = Path.home() / ".keras"
    system_dir: Path = Path("/usr/share/datasets")
    download: bool = True
    # Whether a file dataset's path may be a URL (s3://, gs://, https://, file://): read with
    # the server's credentials, so not where tenants share it.
    urls: bool = True
    # The worker's uploads folder: an npz path is then a key under data_dir that must stay in
    # it, symlinks followed, so a tenant's path reaches no other file on the server.
    uploads: Path | None = None


@dataclass(frozen=True)
class Arrays:
    """A dataset as loaded, before it is shaped for a job."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    kind: str  # image | tabular | sequence
    task: str  # classification | regression
    num_classes: int | None
    source: str
    # A validation split of its own (a file dataset's validation_path), else validation_split.
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


@dataclass(frozen=True)
class Data:
    """Arrays shaped for one job: the inputs the model takes and the labels its loss wants."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    kind: str
    task: str
    num_classes: int | None
    output_units: int
    tokens: bool
    vocab_size: int | None
    source: str
    # A Keras config with several inputs or outputs: x_* and y_* are dicts keyed by the
    # input and output names (an npz's named arrays), and these are each output's units.
    named_outputs: dict[str, int] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(_first(self.x_train).shape[1:])

    @property
    def train_rows(self) -> int:
        return len(_first(self.x_train))

    @property
    def val_rows(self) -> int:
        return 0 if self.x_val is None else len(_first(self.x_val))

    @property
    def test_rows(self) -> int:
        return 0 if self.x_test is None else len(_first(self.x_test))

    @property
    def has_test(self) -> bool:
        return self.x_test is not None

    def sample(self, n: int) -> np.ndarray | dict[str, np.ndarray]:
        """One batch of inputs, for timing the forward pass."""
        return _take(self.x_train, slice(0, n))

    @property
    def eval_split(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """Periodic evaluations use the validation split, else the test split."""
        if self.x_val is not None:
            return "validation", self.x_val, self.y_val
        if self.x_test is not None:
            return "test", self.x_test, self.y_test
        return None


def _first(x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(x.values())) if isinstance(x, dict) else x


def _take(x, rows):
    """Rows of an array, or of each array of a dict of named arrays."""
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


# ---------------------------------------------------------------- MNIST and Fashion-MNIST

_IDX = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _from_idx_dir(folder: Path) -> tuple[np.ndarray, ...] | None:
    files = [folder / name for name in _IDX]
    if not all(f.is_file() for f in files):
        return None
    return tuple(_read_idx(f) for f in files)


def _from_npz(path: Path) -> tuple[np.ndarray, ...] | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["x_train"], z["y_train"], z["x_test"], z["y_test"]


def _places(name: str, paths: DataPaths) -> list[tuple[Path, Callable[[Path], tuple | None]]]:
    """Where `name` may already be, in lookup order, each with the reader for that layout."""
    cache = paths.keras_home / "datasets"
    mine = [paths.data_dir] if paths.data_dir else []
    if name == "mnist":
        return [
            *((d / "mnist.npz", _from_npz) for d in mine),
            *((d / "mnist", _from_idx_dir) for d in mine),
            (cache / "mnist.npz", _from_npz),
            (paths.system_dir / "mnist", _from_idx_dir),
        ]
    return [
        *(
            (d / folder, _from_idx_dir)
            for d in mine
            for folder in ("fashion_mnist", "fashion-mnist")
        ),
        (cache / "fashion-mnist", _from_idx_dir),
        (paths.system_dir / "fashion-mnist", _from_idx_dir),
    ]


_FIX_HINT = {
    "mnist": "copy mnist.npz into {data_dir} or {cache}, or run once where the network is up",
    "fashion_mnist": "install Debian's dataset-fashion-mnist (apt-get install "
    "dataset-fashion-mnist), or copy the four idx .gz files into {data_dir}/fashion_mnist",
}


def _image_set(name: str, paths: DataPaths) -> Arrays:
    """Try each local place in order, then Keras's download; say where it looked on failure."""
    places = _places(name, paths)
    for where, read in places:
        found = read(where)
        if found is not None:
            return _images(found, str(where))
    looked = "\n  ".join(str(where) for where, _ in places)
    hint = _FIX_HINT[name].format(
        data_dir=paths.data_dir or "<data dir>", cache=paths.keras_home / "datasets"
    )
    if not paths.download:
        raise DatasetUnavailable(
            f"dataset {name} is not on this machine; looked in:\n  {looked}\nTo fix: {hint}"
        )
    try:
        import keras

        (x, y), (xt, yt) = getattr(keras.datasets, name).load_data()
    except Exception as exc:  # every download failure means the same thing to the user
        raise DatasetUnavailable(
            f"dataset {name} is not on this machine and downloading it failed "
            f"({type(exc).__name__}: {exc}); looked in:\n  {looked}\nTo fix: {hint}"
        ) from None
    return _images((x, y, xt, yt), f"downloaded by keras.datasets.{name}")


def _images(found: tuple[np.ndarray, ...], source: str) -> Arrays:
    x, y, xt, yt = found
    return Arrays(
        x, y.astype(np.int64), xt, yt.astype(np.int64), "image", "classification", 10, source
    )


# ---------------------------------------------------------------- generated sets


def _rng(spec: DatasetSpec, seed: int, part: int) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process and would break reproducibility.
    return np.random.default_rng([seed, part, zlib.crc32(spec.name.encode())])


Make = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _train_and_test(spec: DatasetSpec, seed: int, default_n: int, make: Make) -> tuple:
    """num_samples training examples, and a fifth as many test examples from another stream."""
    n = spec.num_samples or default_n
    return (*make(_rng(spec, seed, 0), n), *make(_rng(spec, seed, 1), max(n // 5, 1)))


def _linear(spec: DatasetSpec, paths: DataPaths, seed: int) -> Arrays:
    """The seed's regression: x uniform in [0, 1), y = 0.1x + 0.3."""
    noise = spec.noise or 0.0

    def make(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.random((count, 1), dtype=np.float32)
        y = x * 0.1 + 0.3 + noise * rng.standard_normal((count, 1)).astype(np.float32)
        return x, y.astype(np.float32)

    x, y, xt, yt = _train_and_test(spec, seed, 100, make)
    return Arrays(x, y, xt, yt, "tabular", "regression", None, "generated: y = 0.1x + 0.3")


def _synthetic_classification(spec: DatasetSpec, paths: DataPaths, seed: int) -> Arrays:
    """Gaussian blobs, one per class."""
    k, f = spec.num_classes or 2, spec.num_features or 20
    centers = _rng(spec, seed, 9).standard_normal((k, f)).astype(np.float32) * 1.5
    noise = 1.0 if spec.noise is None else spec.noise

    def make(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, k, count)
        x = centers[y] + noise * rng.standard_normal((count, f)).astype(np.float32)
        return x.astype(np.float32), y

    x, y, xt, yt = _train_and_test(spec, seed, 1000, make)
    return Arrays(x, y, xt, yt, "tabular", "classification", k, "generated: gaussian blobs")


def _synthetic_regression(spec: DatasetSpec, paths: DataPaths, seed: int) -> Arrays:
    f = spec.num_features or 8
    w = _rng(spec, seed, 9).standard_normal((f, 1)).astype(np.float32)
    noise = 0.1 if spec.noise is None else spec.noise

    def make(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((count, f)).astype(np.float32)
        y = x @ w + 0.5 + noise * rng.standard_normal((count, 1)).astype(np.float32)
        return x, y.astype(np.float32)

    x, y, xt, yt = _train_and_test(spec, seed, 1000, make)
    return Arrays(x, y, xt, yt, "tabular", "regression", None, "generated: y = xW + 0.5")


def _synthetic_images(spec: DatasetSpec, paths: DataPaths, seed: int) -> Arrays:
    """Each class is a bright bar in its own position and orientation, on noise."""
    k, size, ch = spec.num_classes or 4, spec.image_size or 16, spec.channels or 1
    noise = 0.3 if spec.noise is None else spec.noise
    templates = np.zeros((k, size, size, ch), dtype=np.float32)
    for c in range(k):
        pos = (c * size) // k + size // (2 * k)
        if c % 2:
            templates[c, :, pos, :] = 1.0
        else:
            templates[c, pos, :, :] = 1.0

    def make(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, k, count)
        x = templates[y] + noise * rng.standard_normal((count, size, size, ch)).astype(np.float32)
        return np.clip(x * 255, 0, 255).astype(np.uint8), y

    x, y, xt, yt = _train_and_test(spec, seed, 1000, make)
    return Arrays(x, y, xt, yt, "image", "classification", k, "generated: bars on noise")


def _synthetic_sequence(spec: DatasetSpec, paths: DataPaths, seed: int) -> Arrays:
    """Token ids: the class is the one marker token hidden somewhere in the sequence.
    Real values: the class is the segment (of num_classes) with the largest sum."""
    k, length = spec.num_classes or 2, spec.sequence_length or 20
    vocab = spec.vocab_size
    if vocab is not None and vocab <= k:
        raise DatasetInvalid(f"synthetic_sequence needs vocab_size > num_classes ({k})")

    def make(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, k, count)
        if vocab is not None:
            x = rng.integers(k, vocab, (count, length))
            x[np.arange(count), rng.integers(0, length, count)] = y
            return x.astype(np.int32), y
        f = spec.num_features or 1
        x = rng.standard_normal((count, length, f)).astype(np.float32)
        seg = np.array_split(np.arange(length), k)
        for i, c in enumerate(y):
            x[i, seg[c], :] += 1.0
        return x, y

    x, y, xt, yt = _train_and_test(spec, seed, 1000, make)
    return Arrays(x, y, xt, yt, "sequence", "classification", k, "generated: sequences")


_SHOWN_PATH_CHARS = 200  # a path in a message is cut here: it echoes the tenant's input


def _npz_file(spec: DatasetSpec, paths: DataPaths) -> tuple[Path, str]:
    """The file an npz dataset names, and the name messages give it: the path as written, so
    a tenant is never shown where the server keeps its files."""
    given = spec.path or ""
    shown = given if len(given) <= _SHOWN_PATH_CHARS else f"{given[:_SHOWN_PATH_CHARS]}..."
    path = Path(given)
    if paths.data_dir is not None and not path.is_absolute():
        path = paths.data_dir / path  # there only, never the process's working directory
    try:
        if paths.uploads is not None and not _inside_uploads(Path(given), path, paths.uploads):
            raise DatasetUnavailable(
                f"dataset.path {shown}: not one of the uploads; a job reads only files sent "
                "with UploadDataset, by the path it returned"
            )
        found = path.is_file()
    except OSError:  # a name too long for the file system, say: no file by that name
        found = False
    if not found:
        if paths.uploads is not None or paths.data_dir is None:
            raise DatasetUnavailable(f"dataset.path {shown}: no such file")
        raise DatasetUnavailable(f"dataset.path {shown}: no such file (looked in {path})")
    return path, shown


def _inside_uploads(given: Path, path: Path, uploads: Path) -> bool:
    """Whether `path` (the key `given` under the data folder) is a file of the uploads folder
    that stays in its own folder once every symlink is followed."""
    if given.is_absolute() or ".." in given.parts:
        return False
    root = uploads.resolve()
    folder = path.parent.resolve()
    return folder.is_relative_to(root) and path.resolve().is_relative_to(folder)


def _npz(spec: DatasetSpec, paths: DataPaths, seed: int) -> Arrays:
    """Arrays from a local .npz: x_train/y_train (and x_test/y_test), or x/y; or, for a
    model with several inputs or outputs, named arrays (_named)."""
    file, path = _npz_file(spec, paths)
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        detail = str(exc).replace(str(file), path)
        raise DatasetInvalid(f"dataset.path {path}: not a readable .npz file ({detail})") from None
    if any(NAMED_SEP in k for k in arrays):
        return _named(spec, arrays, path)
    x, y = arrays.get("x_train", arrays.get("x")), arrays.get("y_train", arrays.get("y"))
    if x is None or y is None:
        raise DatasetInvalid(
            f"{path} holds {sorted(arrays)}; it needs x_train and y_train (or x and y)"
        )
    if len(x) != len(y) or len(x) == 0:
        raise DatasetInvalid(f"{path}: x has {len(x)} rows but y has {len(y)}")
    xt, yt = arrays.get("x_test"), arrays.get("y_test")
    integer_labels = np.issubdtype(y.dtype, np.integer) and (y.ndim == 1 or y.shape[1:] == (1,))
    task = spec.task or ("classification" if integer_labels else "regression")
    if task == "classification" and not integer_labels:
        raise DatasetInvalid(f"{path}: classification needs integer class labels in y")
    num_classes = (
        int(max(y.max(), yt.max() if yt is not None else 0)) + 1 if integer_labels else None
    )
    if x.ndim == 4 or (x.ndim == 3 and x.dtype == np.uint8):
        kind = "image"
    elif x.ndim == 3:
        kind = "sequence"
    else:
        kind = "tabular"
    y = y.reshape(len(y)) if integer_labels else y
    if yt is not None and integer_labels:
        yt = yt.reshape(len(yt))
    return Arrays(x, y, xt, yt, kind, task, num_classes if task == "classification" else None, path)


NAMED_SEP = ":"  # x_train:<input name>, y_train:<output name>; np.savez keeps any key
_SPLITS = {"x": "x_train", "y": "y_train"}  # x:<name> is x_train:<name>


def named_splits(keys) -> dict[str, dict[str, str]]:
    """An npz's named array keys by split (x_train, y_train, x_test, y_test), then name."""
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        split, sep, name = key.partition(NAMED_SEP)
        if sep and name:
            out.setdefault(_SPLITS.get(split, split), {})[name] = key
    return out


def _named(spec: DatasetSpec, arrays: dict[str, np.ndarray], path: str) -> Arrays:
    """Named arrays, one per model input and output; matched to the model in prepare. Labels
    are integer classes when every y array holds integers in one column."""
    splits = {
        split: {name: arrays[key] for name, key in keys.items()}
        for split, keys in named_splits(arrays).items()
    }
    x, y = splits.get("x_train"), splits.get("y_train")
    if not x or not y:
        raise DatasetInvalid(
            f"{path} holds {sorted(arrays)}; named arrays need x_train:<input name> and "
            "y_train:<output name>"
        )
    rows = {k: len(v) for k, v in {**x, **y}.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise DatasetInvalid(f"{path}: the training arrays' rows differ or are none ({rows})")
    xt, yt = splits.get("x_test"), splits.get("y_test")
    if not xt or not yt:
        xt = yt = None
    integer = all(
        np.issubdtype(v.dtype, np.integer) and (v.ndim == 1 or v.shape[1:] == (1,))
        for v in y.values()
    )
    task = spec.task or ("classification" if integer else "regression")
    if task == "classification" and not integer:
        raise DatasetInvalid(f"{path}: classification needs integer class labels in every y")
    first = next(iter(x.values()))
    kind = "image" if first.ndim == 4 else "sequence" if first.ndim == 3 else "tabular"
    return Arrays(x, y, xt, yt, kind, task, None, path)  # type: ignore[arg-type]


LOADERS: Registry[Callable[[DatasetSpec, DataPaths, int], Arrays]] = Registry(
    "dataset",
    {
        "fashion_mnist": lambda s, p, seed: _image_set("fashion_mnist", p),
        "linear": _linear,
        "mnist": lambda s, p, seed: _image_set("mnist", p),
        "npz": _npz,
        "csv": lambda s, p, seed: streams.load_table(s, p, "csv"),
        "parquet": lambda s, p, seed: streams.load_table(s, p, "parquet"),
        "tfrecord": lambda s, p, seed: streams.load_tfrecord(s, p),
        "image_folder": lambda s, p, seed: streams.load_image_folder(s, p),
        "synthetic_classification": _synthetic_classification,
        "synthetic_images": _synthetic_images,
        "synthetic_regression": _synthetic_regression,
        "synthetic_sequence": _synthetic_sequence,
    },
)

# ---------------------------------------------------------------- shaping for a job


def load(spec: JobSpec, paths: DataPaths) -> Data | streams.Stream:
    """Load the job's dataset and shape inputs and labels for its model and loss: arrays, or
    a file dataset streamed through tf.data when it would not fit in memory."""
    if spec.dataset.name in names.STREAMED:
        # File loaders take the whole job: how a batch is shaped depends on model and loss.
        found = LOADERS.get(spec.dataset.name)(spec, paths, spec.training.seed)
        return found if isinstance(found, streams.Stream) else prepare(spec, found)
    arrays = LOADERS.get(spec.dataset.name)(spec.dataset, paths, spec.training.seed)
    return prepare(spec, arrays)


def prepare(spec: JobSpec, a: Arrays) -> Data:
    if isinstance(a.x_train, dict):
        return _prepare_named(spec, a)
    ds, arch = spec.dataset, spec.model.architecture
    if arch == "cnn" and a.kind != "image":
        raise DatasetInvalid(f"model cnn needs images but {a.source} holds {a.kind} data")
    if arch == "rnn" and a.kind == "tabular":
        raise DatasetInvalid(f"model rnn needs sequences but {a.source} holds tabular data")
    if a.task == "regression" and spec.label_format != "dense":
        raise DatasetInvalid(f"{a.source} holds regression targets; {spec.loss.name} needs classes")

    tokens = ds.tokens or (a.kind != "image" and a.x_train.ndim == 2 and arch == "rnn")
    flatten = ds.flatten if ds.flatten is not None else arch in ("mlp", "linear")

    def inputs(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        if tokens:
            return x.astype(np.int32)
        if a.kind == "image":
            scale = 255.0 if ds.normalize and x.dtype == np.uint8 else 1.0
            x = x.astype(np.float32) / scale
            if x.ndim == 3:
                x = x[..., None]
            if arch == "rnn":  # rows are time steps
                return x.reshape(len(x), x.shape[1], -1)
            if flatten:
                return x.reshape(len(x), -1)
            return x
        return x.astype(np.float32)

    fmt = spec.label_format
    k = a.num_classes
    if a.task == "regression":
        units = 1 if a.y_train.ndim == 1 else int(np.prod(a.y_train.shape[1:]))
    elif fmt == "binary" and k == 2:
        units = 1
    else:
        units = int(k or 1)

    def labels(y: np.ndarray | None) -> np.ndarray | None:
        if y is None:
            return None
        if a.task == "regression":
            return y.astype(np.float32).reshape(len(y), -1)
        if fmt == "sparse":
            return y.astype(np.int32)
        if units == 1:
            return y.astype(np.float32).reshape(-1, 1)
        return np.eye(units, dtype=np.float32)[y]

    x, y = inputs(a.x_train), labels(a.y_train)
    x_val = y_val = None
    if a.x_val is not None:
        x_val, y_val = inputs(a.x_val), labels(a.y_val)
    elif ds.validation_split > 0:
        order = np.random.default_rng(spec.training.seed).permutation(len(x))
        n_val = max(int(len(x) * ds.validation_split), 1)
        val, train = order[:n_val], order[n_val:]
        x, y, x_val, y_val = x[train], y[train], x[val], y[val]
    has_test = ds.evaluate_on_test and a.x_test is not None
    return Data(
        x_train=x,
        y_train=y,
        x_val=x_val,
        y_val=y_val,
        x_test=inputs(a.x_test) if has_test else None,
        y_test=labels(a.y_test) if has_test else None,
        kind=a.kind,
        task=a.task,
        num_classes=k,
        output_units=units,
        tokens=bool(tokens),
        vocab_size=ds.vocab_size if ds.tokens else (int(a.x_train.max()) + 1 if tokens else None),
        source=a.source,
    )


def _prepare_named(spec: JobSpec, a: Arrays) -> Data:
    """Named arrays for a Keras config's inputs and outputs: each fed the array named after
    it, as float32 (integer inputs stay int32, for embeddings; uint8 images scaled by
    normalize); the labels of each output shaped for the spec's one loss."""
    model = spec.model
    graph = getattr(model, "graph", None)
    if graph is None:
        raise DatasetInvalid(
            f"{a.source} holds named arrays (x_train:NAME), which feed a keras config's named "
            "inputs and outputs; use x_train and y_train for this model"
        )
    wanted = {"x_train": [n for n, _, _ in graph.inputs], "y_train": list(graph.outputs)}
    for split, names_ in wanted.items():
        given = a.x_train if split == "x_train" else a.y_train
        for n in names_:
            if n not in given:
                raise DatasetInvalid(
                    f"{a.source} has no array {split}{NAMED_SEP}{n} for the model's "
                    f"{'input' if split == 'x_train' else 'output'} {n!r}; it holds "
                    f"{', '.join(f'{split}{NAMED_SEP}{k}' for k in sorted(given))}"
                )
    normalize = spec.dataset.normalize

    def inputs(xs):
        if xs is None:
            return None
        out = {}
        for n in wanted["x_train"]:
            v = xs[n]
            if v.dtype == np.uint8:
                v = v.astype(np.float32) / (255.0 if normalize else 1.0)
            elif np.issubdtype(v.dtype, np.integer):
                v = v.astype(np.int32)
            out[n] = v.astype(np.float32) if v.dtype != np.int32 else v
        return out

    fmt = spec.label_format
    units: dict[str, int] = {}
    for n in wanted["y_train"]:
        y = a.y_train[n]
        if a.task == "regression":
            units[n] = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
        else:
            k = int(max(y.max(), a.y_test[n].max() if a.y_test and n in a.y_test else 0)) + 1
            units[n] = 1 if fmt == "binary" and k == 2 else k

    def labels(ys):
        if ys is None:
            return None
        out = {}
        for n in wanted["y_train"]:
            y = ys[n]
            if a.task == "regression":
                out[n] = y.astype(np.float32).reshape(len(y), -1)
            elif fmt == "sparse":
                out[n] = y.reshape(len(y)).astype(np.int32)
            elif units[n] == 1:
                out[n] = y.astype(np.float32).reshape(-1, 1)
            else:
                out[n] = np.eye(units[n], dtype=np.float32)[y.reshape(len(y))]
        return out

    x, y = inputs(a.x_train), labels(a.y_train)
    x_val = y_val = None
    ds = spec.dataset
    if ds.validation_split > 0:
        order = np.random.default_rng(spec.training.seed).permutation(len(_first(x)))
        n_val = max(int(len(order) * ds.validation_split), 1)
        val, train = order[:n_val], order[n_val:]
        x, y, x_val, y_val = _take(x, train), _take(y, train), _take(x, val), _take(y, val)
    has_test = ds.evaluate_on_test and a.x_test is not None
    first = units[wanted["y_train"][0]]
    return Data(
        x_train=x,  # type: ignore[arg-type]
        y_train=y,  # type: ignore[arg-type]
        x_val=x_val,  # type: ignore[arg-type]
        y_val=y_val,  # type: ignore[arg-type]
        x_test=inputs(a.x_test) if has_test else None,
        y_test=labels(a.y_test) if has_test else None,
        kind=a.kind,
        task=a.task,
        num_classes=None if a.task == "regression" else first,
        output_units=first,
        tokens=False,
        vocab_size=None,
        source=a.source,
        named_outputs=units,
    )
