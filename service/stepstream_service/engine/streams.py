"""File datasets (CSV, Parquet, TFRecord, image folders) as tf.data pipelines: read, shuffled in
a bounded buffer, batched and prefetched while training, so a dataset larger than the worker's
memory trains. One that fits is read once into arrays instead (the in-memory fast path, the
same as every named dataset's): `stream` in the spec forces either.

Validation examples come from validation_path, or validation_split holds out rows by a hash
of their position (the same rows every epoch, never a shuffled view); test examples from
test_path.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepstream.kernel.spec import DatasetSpec, JobSpec
from stepstream_service.engine import footprint, sources, tables
from stepstream_service.errors import DatasetInvalid

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 10_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# A dataset is read into memory when its arrays would take at most this share of what the
# worker has free: the arrays are held twice (as read and as shaped) and once more in the graph.
IN_MEMORY_SHARE = 0.25

Batches = Callable[[], "object"]  # () -> tf.data.Dataset of (x, y) batches, one pass


def held_out(split: float) -> Callable[[np.ndarray], np.ndarray]:
    """Which row positions validation_split holds out: a fixed hash of the position, so the
    same rows every pass and about `split` of them."""

    def mask(index: np.ndarray) -> np.ndarray:
        if split <= 0:
            return np.zeros(len(index), bool)
        h = (index.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
        return h < np.uint64(int(split * 2**32))

    return mask


@dataclass
class Stream:
    """A file dataset as the trainer reads it: batches of shaped (inputs, labels) per split,
    and the shapes the model is built from."""

    kind: str
    task: str
    num_classes: int | None
    output_units: int
    input_shape: tuple[int, ...]
    source: str
    rows: int
    val_rows: int
    test_rows: int
    make: Callable[[str, int, bool, int], object]  # (split, batch, shuffle, seed) -> Dataset
    tokens: bool = False
    vocab_size: int | None = None
    has_validation: bool = False
    has_test: bool = False

    @property
    def train_rows(self) -> int:
        return self.rows

    @property
    def eval_split(self) -> tuple[str, object, None] | None:
        if self.has_validation:
            return "validation", "validation", None
        if self.has_test:
            return "test", "test", None
        return None

    def sample(self, n: int):
        """One batch of inputs, for timing the forward pass."""
        for x, _ in self.make("train", n, False, 0).take(1):
            return x
        raise DatasetInvalid(f"{self.source}: no training rows")

    def batches(self, batch: int, shuffle: bool, seed: int, start: int, total: int):
        """`total - start` training batches, epoch after epoch, reshuffled each epoch."""
        import tensorflow as tf

        # Each pass over the files shuffles anew (from_generator re-runs its generator, and
        # tf.data reshuffles each iteration).
        data = self.make("train", batch, shuffle, seed).repeat()
        data = data.skip(start).take(total - start)
        # Known length: Keras then ends the epoch without a warning that the data ran out.
        data = data.apply(tf.data.experimental.assert_cardinality(total - start))
        return data.prefetch(tf.data.AUTOTUNE)

    def split(self, name: str, batch: int):
        """A validation or test split, one pass in order. Its length is known (Keras then ends
        the evaluation without a warning that the data ran out)."""
        import tensorflow as tf

        rows = self.val_rows if name == "validation" else self.test_rows
        data = self.make(name, batch, False, 0)
        if rows:
            data = data.apply(tf.data.experimental.assert_cardinality(math.ceil(rows / batch)))
        return data.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- shaping


def _shaping(spec: JobSpec, kind: str, task: str, num_classes: int | None, label_units: int):
    """(output_units, a tf function shaping a batch's inputs and labels) as prepare() does."""
    import tensorflow as tf

    ds, fmt, arch = spec.dataset, spec.label_format, spec.model.architecture
    if task == "regression" and fmt != "dense":
        raise DatasetInvalid(
            f"dataset {ds.name} holds regression targets; {spec.loss.name} needs classes"
        )
    if task == "regression":
        units = label_units
    elif fmt == "binary" and num_classes == 2:
        units = 1
    else:
        units = int(num_classes or 1)
    flatten = ds.flatten if ds.flatten is not None else arch in ("mlp", "linear")

    def shape(x, y):
        x = tf.cast(x, tf.float32)
        if kind == "image":
            if ds.normalize:
                x = x / 255.0
            if arch == "rnn":
                s = tf.shape(x)
                x = tf.reshape(x, [s[0], s[1], s[2] * s[3]])
            elif flatten:
                x = tf.reshape(x, [tf.shape(x)[0], -1])
        if task == "regression":
            y = tf.reshape(tf.cast(y, tf.float32), [tf.shape(y)[0], -1])
        elif fmt == "sparse":
            y = tf.cast(y, tf.int32)
        elif units == 1:
            y = tf.reshape(tf.cast(y, tf.float32), [-1, 1])
        else:
            y = tf.one_hot(tf.cast(y, tf.int32), units, dtype=tf.float32)
        return x, y

    return units, shape


def _model_input(spec: JobSpec, kind: str, example: tuple[int, ...]) -> tuple[int, ...]:
    arch, ds = spec.model.architecture, spec.dataset
    if kind != "image":
        return example
    if arch == "rnn":
        return (example[0], example[1] * example[2])
    flatten = ds.flatten if ds.flatten is not None else arch in ("mlp", "linear")
    return (math.prod(example),) if flatten else example


# ---------------------------------------------------------------- tables (CSV, Parquet)


def _files(ds: DatasetSpec, paths) -> tuple:
    """The training files, and the validation and test files when the spec names them (None
    otherwise; test files only when the job evaluates on them)."""
    val, test = ds.validation_path, ds.test_path if ds.evaluate_on_test else None
    return (
        sources.resolve(ds.path, "path", paths),
        sources.resolve(val, "validation_path", paths) if val else None,
        sources.resolve(test, "test_path", paths) if test else None,
    )


def _table_stream(spec: JobSpec, paths, fmt: str) -> tuple[Stream | None, object]:
    ds = spec.dataset
    files = _files(ds, paths)
    split = ds.validation_split if not ds.validation_path else 0.0
    return tables.table(ds, fmt, files[0], held_out(split)), files


def _table_blocks(
    t: tables.Table, files, which: str, split: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of one split: a validation_split's rows by their position in the training files."""
    if which == "validation" and files[1] is None:
        source, keep = files[0], True
    elif which == "validation":
        source, keep = files[1], None
    elif which == "test":
        source, keep = files[2], None
    else:
        source, keep = files[0], False if split > 0 else None
    mask_of = held_out(split)
    seen = 0
    for x, y in t.blocks(source):
        n = len(x)
        if keep is not None:
            m = mask_of(np.arange(seen, seen + n))
            m = m if keep else ~m
            x, y = x[m], y[m]
        seen += n
        if len(x):
            yield x, y


def _shuffled(blocks: Iterator, buffer: int, rng: np.random.Generator | None) -> Iterator:
    """Blocks mixed `buffer` rows at a time (rows gathered until that many are held, then
    permuted and handed on whole); as read when `rng` is None. tf.data cuts them into batches:
    Python hands over a few large arrays rather than a batch at a time."""
    if rng is None:
        yield from blocks
        return
    xs, ys, held = [], [], 0
    for x, y in blocks:
        xs.append(x)
        ys.append(y)
        held += len(x)
        if held >= buffer:
            yield _mixed(xs, ys, rng)
            xs, ys, held = [], [], 0
    if held:
        yield _mixed(xs, ys, rng)


def _mixed(xs: list, ys: list, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x, y = (np.concatenate(xs), np.concatenate(ys)) if len(xs) > 1 else (xs[0], ys[0])
    order = rng.permutation(len(x))
    return x[order], y[order]


def load_table(spec: JobSpec, paths, fmt: str):
    """A CSV or Parquet dataset: arrays when they fit (or stream: false), else a Stream."""
    from stepstream_service.engine.datasets import Arrays

    ds = spec.dataset
    t, files = _table_stream(spec, paths, fmt)
    split = ds.validation_split if not ds.validation_path else 0.0
    width = t.width
    label_units = 1
    source = files[0].shown
    per_row = (width + 1) * 4
    if _in_memory(ds, t.rows * per_row):

        def gather(which: str):
            got = list(_table_blocks(t, files, which, split))
            if not got:
                return None, None
            x, y = (np.concatenate(p) for p in zip(*got, strict=True))
            return x, (y.reshape(-1, 1) if t.task == "regression" else y)

        x, y = gather("train")
        if x is None:
            raise DatasetInvalid(f"{source}: no training rows")
        xv, yv = gather("validation") if (files[1] is not None or split > 0) else (None, None)
        xt, yt = gather("test") if files[2] is not None else (None, None)
        return Arrays(x, y, xt, yt, "tabular", t.task, t.num_classes, source, xv, yv)

    import tensorflow as tf

    units, shape = _shaping(spec, "tabular", t.task, t.num_classes, label_units)
    ydtype = tf.float32 if t.task == "regression" else tf.int64
    signature = (tf.TensorSpec((None, width), tf.float32), tf.TensorSpec((None,), ydtype))
    buffer = ds.shuffle_buffer or SHUFFLE_BUFFER

    def make(which: str, batch: int, shuffle: bool, seed: int):
        passes = itertools.count()

        def gen():
            rng = np.random.default_rng([seed, next(passes)]) if shuffle else None
            yield from _shuffled(_table_blocks(t, files, which, split), buffer, rng)

        data = tf.data.Dataset.from_generator(gen, output_signature=signature)
        # Shaped a block at a time, then cut into batches across blocks (only a pass's last
        # batch is short, as with arrays).
        return data.map(shape).rebatch(batch)

    # The validation and test files' rows, counted in a pass over their label column.
    val_rows = t.held_out if files[1] is None else t.count(files[1])
    test_rows = t.count(files[2]) if files[2] is not None else 0
    log.info("streaming %s: %d rows, %d inputs per row", source, t.rows, width)
    return Stream(
        kind="tabular",
        task=t.task,
        num_classes=t.num_classes,
        output_units=units,
        input_shape=(width,),
        source=source,
        rows=t.rows - t.held_out,
        val_rows=val_rows,
        test_rows=test_rows,
        make=make,
        has_validation=files[1] is not None or split > 0,
        has_test=files[2] is not None,
    )


def _in_memory(ds: DatasetSpec, nbytes: int) -> bool:
    """Read into arrays: when asked, or (unasked) when they take a small share of what the
    worker has free now."""
    if ds.stream is not None:
        return not ds.stream
    room = footprint.headroom()
    return room is None or nbytes <= IN_MEMORY_SHARE * room.free


# ---------------------------------------------------------------- TFRecord


def load_tfrecord(spec: JobSpec, paths):
    import tensorflow as tf

    from stepstream_service.engine.datasets import Arrays

    ds = spec.dataset
    fs = ds.feature_spec or {}
    label = ds.label or list(fs)[-1]
    names = list(ds.features) if ds.features else [n for n in fs if n != label]
    if not names:
        raise DatasetInvalid("dataset.feature_spec: no features beside the label")
    described = {
        n: tf.io.FixedLenFeature(f.shape, tf.float32 if f.dtype == "float32" else tf.int64)
        for n, f in fs.items()
        if n in names or n == label
    }
    width = sum(math.prod(fs[n].shape) for n in names)
    label_units = math.prod(fs[label].shape)
    task = ds.task or ("regression" if fs[label].dtype == "float32" else "classification")
    split = ds.validation_split if not ds.validation_path else 0.0
    train, val, test = _files(ds, paths)

    def parse(serialized):
        got = tf.io.parse_example(serialized, described)
        n = tf.shape(serialized)[0]
        x = tf.concat([tf.reshape(tf.cast(got[k], tf.float32), [n, -1]) for k in names], axis=1)
        y = got[label]
        y = (
            tf.reshape(y, [n])
            if label_units == 1 and task == "classification"
            else tf.reshape(y, [n, -1])
        )
        return x, y

    def records(files: sources.Files, which: str | None):
        data = (
            tf.data.TFRecordDataset(list(files.files))
            if not files.remote
            else _remote_records(files)
        )
        if which is not None and split > 0:
            cut = np.uint64(int(split * 2**32))

            def keep(i, _):
                h = tf.math.floormod(
                    tf.cast(i, tf.uint64) * tf.constant(2654435761, tf.uint64), 2**32
                )
                held = h < cut
                return held if which == "validation" else tf.logical_not(held)

            data = data.enumerate().filter(keep).map(lambda _, r: r)
        return data

    # One pass over the training records: the row count and, for classes, the largest label.
    count, top = 0, -1
    try:
        for x, y in records(train, "train").batch(4096).map(parse):
            count += int(x.shape[0])
            if task == "classification":
                top = max(top, int(tf.reduce_max(y)))
    except tf.errors.OpError as exc:
        raise DatasetInvalid(
            f"{train.shown}: not readable as tf.train.Example records with "
            f"dataset.feature_spec ({exc.message.splitlines()[0][:200]})"
        ) from None
    if count == 0:
        raise DatasetInvalid(f"{train.shown}: no records")
    num_classes = (ds.num_classes or max(top + 1, 2)) if task == "classification" else None

    def counted(data) -> int:
        return int(data.reduce(np.int64(0), lambda n, _: n + 1))

    held = 0
    if split > 0 and val is None:
        held = counted(records(train, "validation"))
    rows = count
    units, shape = _shaping(spec, "tabular", task, num_classes, label_units)

    def source_of(which: str):
        if which == "train":
            return records(train, "train")
        if which == "validation":
            return records(val, None) if val is not None else records(train, "validation")
        return records(test, None)

    if _in_memory(ds, rows * (width + label_units) * 4):

        def gather(which: str):
            xs, ys = [], []
            for x, y in source_of(which).batch(4096).map(parse):
                xs.append(x.numpy())
                ys.append(y.numpy())
            if not xs:
                return None, None
            return np.concatenate(xs), np.concatenate(ys)

        x, y = gather("train")
        xv, yv = gather("validation") if (val is not None or split > 0) else (None, None)
        xt, yt = gather("test") if test is not None else (None, None)
        return Arrays(x, y, xt, yt, "tabular", task, num_classes, train.shown, xv, yv)

    buffer = ds.shuffle_buffer or SHUFFLE_BUFFER

    def make(which: str, batch: int, shuffle: bool, seed: int):
        data = source_of(which)
        if shuffle:
            data = data.shuffle(buffer, seed=seed)
        return data.batch(batch).map(parse, num_parallel_calls=tf.data.AUTOTUNE).map(shape)

    return Stream(
        kind="tabular",
        task=task,
        num_classes=num_classes,
        output_units=units,
        input_shape=(width,),
        source=train.shown,
        rows=rows - held,
        val_rows=held if val is None else counted(records(val, None)),
        test_rows=counted(records(test, None)) if test is not None else 0,
        make=make,
        has_validation=val is not None or split > 0,
        has_test=test is not None,
    )


def _remote_records(files: sources.Files):
    """TFRecord files read through fsspec (a URL TensorFlow's own file systems lack): the
    framing is 8 bytes of length, 4 of its CRC, the record, 4 of the record's CRC."""
    import tensorflow as tf

    def gen():
        for file in files.files:
            with files.open(file) as f:
                while True:
                    head = f.read(12)
                    if len(head) < 12:
                        break
                    n = int.from_bytes(head[:8], "little")
                    record = f.read(n)
                    f.read(4)
                    yield record

    return tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((), tf.string))


# ---------------------------------------------------------------- image folders


def image_files(folder: Path, what: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes): one subfolder per class, sorted as Keras sorts them. An
    archive with one top folder holding the class folders is read through it."""
    entries = sorted(p for p in folder.iterdir() if p.is_dir())
    if len(entries) == 1 and not any(_images(entries[0])):
        entries = sorted(p for p in entries[0].iterdir() if p.is_dir())
    files, labels, classes = [], [], []
    for folder_ in entries:
        found = sorted(str(p) for p in _images(folder_))
        if not found:
            continue
        labels += [len(classes)] * len(found)
        classes.append(folder_.name)
        files += found
    if len(classes) < 2:
        raise DatasetInvalid(
            f"{what}: an image folder needs a subfolder per class, at least two, each holding "
            f"images ({', '.join(IMAGE_EXTENSIONS)}); found {len(classes)}"
        )
    return files, labels, classes


def _images(folder: Path) -> Iterator[Path]:
    for root, _, names in os.walk(folder):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                yield Path(root) / name


def load_image_folder(spec: JobSpec, paths):
    import tensorflow as tf

    from stepstream_service.engine.datasets import Arrays

    ds = spec.dataset
    cache = paths.data_dir / "cache" if paths.data_dir is not None else None

    def listing(given: str, field: str):
        found = sources.resolve(given, field, paths, folder=True)
        return image_files(sources.local_folder(found, cache), found.shown)

    files, labels, classes = listing(ds.path, "path")
    first = tf.io.decode_image(tf.io.read_file(files[0]), expand_animations=False)
    size = ds.image_size or int(first.shape[0])
    width = ds.image_size or int(first.shape[1])
    channels = ds.channels or (1 if first.shape[-1] == 1 else 3)
    split = ds.validation_split if not ds.validation_path else 0.0
    index = np.arange(len(files))
    mask = held_out(split)(index)
    lists = {
        "train": (
            [f for f, m in zip(files, mask, strict=True) if not m],
            [lab for lab, m in zip(labels, mask, strict=True) if not m],
        )
    }
    if ds.validation_path:
        vf, vl, vc = listing(ds.validation_path, "validation_path")
        lists["validation"] = (vf, [classes.index(vc[i]) if vc[i] in classes else -1 for i in vl])
    elif split > 0:
        lists["validation"] = (
            [f for f, m in zip(files, mask, strict=True) if m],
            [lab for lab, m in zip(labels, mask, strict=True) if m],
        )
    if ds.test_path and ds.evaluate_on_test:
        tf_, tl, tc = listing(ds.test_path, "test_path")
        lists["test"] = (tf_, [classes.index(tc[i]) if tc[i] in classes else -1 for i in tl])
    for name, (_, labs) in lists.items():
        if -1 in labs:
            raise DatasetInvalid(
                f"dataset.{name}_path: holds a class folder the training data lacks"
            )
    example = (size, width, channels)

    def decode(path, label):
        raw = tf.io.read_file(path)
        image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
        image = tf.image.resize(image, (size, width))
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    def pipeline(which: str, shuffle: bool, seed: int):
        f, lab = lists[which]
        data = tf.data.Dataset.from_tensor_slices((f, np.asarray(lab, np.int64)))
        if shuffle:  # the file names are shuffled whole: they are small
            data = data.shuffle(len(f), seed=seed)
        return data.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    source = ds.path
    if _in_memory(ds, len(files) * math.prod(example)):

        def gather(which: str):
            if which not in lists or not lists[which][0]:
                return None, None
            xs, ys = [], []
            for x, y in pipeline(which, False, 0).batch(256):
                xs.append(x.numpy())
                ys.append(y.numpy())
            return np.concatenate(xs), np.concatenate(ys)

        x, y = gather("train")
        xv, yv = gather("validation")
        xt, yt = gather("test")
        return Arrays(x, y, xt, yt, "image", "classification", len(classes), source, xv, yv)

    units, shape = _shaping(spec, "image", "classification", len(classes), 1)

    def make(which: str, batch: int, shuffle: bool, seed: int):
        return pipeline(which, shuffle, seed).batch(batch).map(shape)

    return Stream(
        kind="image",
        task="classification",
        num_classes=len(classes),
        output_units=units,
        input_shape=_model_input(spec, "image", example),
        source=source,
        rows=len(lists["train"][0]),
        val_rows=len(lists.get("validation", ([],))[0]),
        test_rows=len(lists.get("test", ([],))[0]),
        make=make,
        has_validation="validation" in lists,
        has_test="test" in lists,
    )
