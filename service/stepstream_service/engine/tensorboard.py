"""A job's TensorBoard event files, written from the events the job streams.

`Board.tee(emit)` wraps the trainer's emit: every StepEvent, EvalEvent and the final
ResultEvent pass through it on their way out, so the scalars in the event files are the very
values the stream carries. Per step: `train/loss`, `train/accuracy` (or `train/mae`) and
`train/learning_rate`, one Event record each step. Per evaluation: `<split>/<metric>`, and a
histogram of every layer's weights (`<layer>/<weight>/histogram`, Keras's own tags). At the end:
`test/<metric>`, the model's Keras graph (TensorBoard's Graphs tab, tag `keras`) and, on the
TensorFlow backend, its forward pass as an op graph.

Cost: a `tf.summary.scalar` call per step would take most of a step's time at the speeds the
engine runs. Here a step is one small Event proto handed to TensorFlow's record writer (its
crc32c is native code), and nothing is flushed more often than every FLUSH_SECONDS.

A retried job: the first event an attempt writes, at step S, drops every event at or past S
that earlier attempts left (their files are rewritten without them), so TensorBoard shows one
value per step, from the attempt that went on, like the job's stored history.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import (
    event_pb2,
    summary_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from tensorboard.plugins.graph import metadata as graph_metadata
from tensorboard.plugins.histogram import summary_v2 as histogram_summary

from stepstream.kernel.events import Event

log = logging.getLogger(__name__)

FOLDER = "tensorboard"  # under the job's workdir, and under jobs/<job_id>/ in the artifact store
FLUSH_SECONDS = 2.0
FILE_PREFIX = "events.out.tfevents."
# The graph's own file; "0" sorts it before every attempt's file (named by its start time).
GRAPH_FILE = f"{FILE_PREFIX}0.graph"


class Board:
    """The event file one attempt of one job writes into `folder`.

    `model()` returns the Keras model once it exists (None before); it is asked at each
    evaluation (histograms) and at close (graph). Writing never fails the job: an error is
    logged once and the board stops writing.
    """

    def __init__(self, folder: Path | str, model: Callable[[], Any], job_id: str = ""):
        self.folder = Path(folder)
        self.model = model
        self.job_id = job_id
        self._writer: Any = None
        self._flushed = 0.0  # wall time of the last flush
        self._broken = False
        self._template: tuple[str, event_pb2.Event, list[Any]] | None = None
        self._last_eval: tuple[str, int] | None = None  # (split, step)

    # -------------------------------------------------------------------------- the stream

    def tee(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        """`emit`, with every event also written here first."""

        def both(event: Event) -> None:
            if not self._broken:
                self.write(event)
            emit(event)

        return both

    def write(self, event: Event) -> None:
        try:
            kind = event.kind
            if kind == "step":
                self._step(event)
            elif kind == "eval":
                self._eval(event)
            elif kind == "result":
                self._result(event)
        except Exception:  # TensorBoard is a view of the job, never a reason to fail it
            self._broken = True
            log.warning("job %s: TensorBoard files stop here", self.job_id, exc_info=True)

    def _step(self, event: Any) -> None:
        # One Event reused for every step, its values set in place: far cheaper than building
        # a new one per step.
        metric = "accuracy" if event.accuracy is not None else "mae"
        if self._template is None or self._template[0] != metric:
            template = event_pb2.Event()
            tags = ("train/loss", f"train/{metric}", "train/learning_rate")
            self._template = (metric, template, [template.summary.value.add(tag=t) for t in tags])
        _, template, (loss, value, rate) = self._template
        template.step, template.wall_time = event.step, event.time
        loss.simple_value = event.loss
        value.simple_value = getattr(event, metric)
        rate.simple_value = event.learning_rate
        self._record(template)
        if event.time - self._flushed > FLUSH_SECONDS:
            self.flush()

    def _eval(self, event: Any) -> None:
        values = [
            summary_pb2.Summary.Value(tag=f"{event.split}/{name}", simple_value=value)
            for name, value in event.values.items()
        ]
        self._put(event.step, event.time, summary_pb2.Summary(value=values))
        self._last_eval = (event.split, event.step)
        self.histograms(event.step, event.time)
        self.flush()

    def _result(self, event: Any) -> None:
        # Evaluations use the test split when there is no validation split: one at the last
        # step has already written these very values.
        if event.test_metrics and self._last_eval != ("test", event.steps):
            values = [
                summary_pb2.Summary.Value(tag=f"test/{name}", simple_value=value)
                for name, value in event.test_metrics.items()
            ]
            self._put(event.steps, event.time, summary_pb2.Summary(value=values))
        self.flush()

    def histograms(self, step: int, wall_time: float | None = None) -> None:
        """A histogram of each layer's weights and biases, tagged as Keras's TensorBoard
        callback does (`dense_1/kernel/histogram`) in a fresh process."""
        model = self.model()
        if model is None:
            return
        import keras

        summary = summary_pb2.Summary()
        for name, layer in _layer_names(model):
            for weight in layer.weights:
                tag = f"{name}/{weight.name.replace(':', '_')}/histogram"
                data = keras.ops.convert_to_numpy(weight)
                summary.value.extend(histogram_summary.histogram_pb(tag, data).value)
        if summary.value:
            self._put(step, wall_time or time.time(), summary)

    # -------------------------------------------------------------------------- the graph

    def graph(self) -> None:
        """The model's Keras graph (a JSON config) and, on TensorFlow, its op graph, in a file
        of their own that each attempt replaces (so a retried job has one graph, not two)."""
        model = self.model()
        if model is None:
            return
        import tensorflow as tf

        events = [_version()]
        with contextlib.suppress(Exception):  # a model Keras cannot describe has no config
            tensor = tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                string_val=[model.to_json().encode()],
            )
            plugin = summary_pb2.SummaryMetadata.PluginData(
                plugin_name=graph_metadata.PLUGIN_NAME_KERAS_MODEL, content=b"1"
            )
            value = summary_pb2.Summary.Value(
                tag="keras", tensor=tensor, metadata=summary_pb2.SummaryMetadata(plugin_data=plugin)
            )
            events.append(
                event_pb2.Event(wall_time=time.time(), summary=summary_pb2.Summary(value=[value]))
            )
        graph_def = _op_graph(model)
        if graph_def is not None:
            events.append(event_pb2.Event(wall_time=time.time(), graph_def=graph_def))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / GRAPH_FILE
        tmp = path.with_name(f".{path.name}.partial")
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for event in events:
                writer.write(event.SerializeToString())
        tmp.replace(path)

    def close(self) -> None:
        """Write the graph, then flush and close the file (what was written is kept)."""
        if not self._broken:
            try:
                self.graph()
            except Exception:
                log.warning("job %s: no graph in TensorBoard", self.job_id, exc_info=True)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        self._flushed = time.time()

    # -------------------------------------------------------------------------- records

    def _put(self, step: int, wall_time: float, summary: summary_pb2.Summary) -> None:
        self._record(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def _record(self, event: event_pb2.Event) -> None:
        if self._writer is None:
            self._open(event.step)
        self._writer.write(event.SerializeToString())

    def _open(self, first_step: int) -> None:
        import tensorflow as tf

        self.folder.mkdir(parents=True, exist_ok=True)
        for old in event_files(self.folder):
            truncate(old, first_step)
        # TensorBoard reads a run's files in name order: the time keeps attempts in order.
        name = f"{FILE_PREFIX}{time.time():.6f}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}"
        self._writer = tf.io.TFRecordWriter(str(self.folder / name))
        self._writer.write(_version().SerializeToString())
        self._flushed = time.time()


def event_files(folder: Path | str) -> list[Path]:
    """The attempts' event files in `folder`, oldest first (TensorBoard's order)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.startswith(FILE_PREFIX) and p.name != GRAPH_FILE
    )


def _version() -> event_pb2.Event:
    return event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")


def read_events(path: Path | str) -> Iterator[event_pb2.Event]:
    """The events of one file as written (TensorBoard's own reader, without its migration of
    old summary forms to new ones)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    for record in RawEventFileLoader(str(path)).Load():
        yield event_pb2.Event.FromString(record)


def truncate(path: Path, step: int) -> None:
    """Drop the events of `path` at or past `step` (a later attempt writes them again)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    records = list(RawEventFileLoader(str(path)).Load())
    kept = [r for r in records if event_pb2.Event.FromString(r).step < step]
    if len(kept) == len(records):
        return
    tmp = path.with_name(f".{path.name}.partial")
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for record in kept:
            writer.write(record)
    tmp.replace(path)
    log.info("%s: %d events at or past step %d dropped", path.name, len(records) - len(kept), step)


def _layer_names(model: Any) -> Iterator[tuple[str, Any]]:
    """Each layer with the name Keras gives it in a process that built only this model
    ("dense", "dense_1", ...): a worker builds many models, and Keras's own names go on
    counting from one job to the next, so a retried job's tags would differ from its first
    attempt's."""
    from keras.src.utils.naming import to_snake_case

    seen: dict[str, int] = {}
    for layer in model.layers:
        base = to_snake_case(type(layer).__name__)
        count = seen.get(base, 0)
        seen[base] = count + 1
        yield (base if count == 0 else f"{base}_{count}"), layer


def _op_graph(model: Any) -> bytes | None:
    """The serialized GraphDef of the model's forward pass, on the TensorFlow backend."""
    import keras

    if keras.config.backend() != "tensorflow":
        return None
    import tensorflow as tf

    try:
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in model.inputs]
        forward = tf.function(lambda *x: model(list(x) if len(x) > 1 else x[0], training=False))
        return forward.get_concrete_function(*specs).graph.as_graph_def().SerializeToString()
    except Exception:  # a subclassed model without inputs, say: the Keras graph is there
        log.debug("no op graph for the model", exc_info=True)
        return None
