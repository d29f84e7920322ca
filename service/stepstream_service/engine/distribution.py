"""One job on several devices, data-parallel (runtime.devices > 1), on one machine or several
(runtime.machines > 1).

TensorFlow's MirroredStrategy keeps a copy of the model on each device, splits every global
batch evenly between them and sums the gradients before each update, so N devices train the
job exactly as one device would at the same global batch. A machine without GPUs can split
its CPU into logical devices: slower than one device (they share the same cores), but the same
code path, which is what tests and small trials on a laptop need.

Across machines, MultiWorkerMirroredStrategy does the same over gRPC between one process per
machine (a Cluster: every rank's address). Keras 3's own loops fail under it (they reduce
scalars along an axis, and build the model from a batch averaged across the workers), so a job
there runs on this module's train and test functions and builds from its local batch; every
decision that ends or changes the run is agreed by all ranks (agreed), and every rank starts
from the chief's variables (from_chief).

Only the TensorFlow backend: the Keras distribution API's TensorFlow side is a stub, and JAX's
is not what this service runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import keras

from stepstream_service.errors import TrainerError


class NotEnoughDevices(TrainerError):
    """The job asks for more devices than this worker holds, or a backend that cannot split."""

    reason = "not_enough_devices"


def split_cpu(n: int) -> None:
    """Split the CPU into `n` logical devices. TensorFlow fixes its devices when its runtime
    starts (the first op, or listing logical devices), so this must come before that."""
    if n <= 1:
        return
    if keras.config.backend() != "tensorflow":
        raise RuntimeError(
            f"splitting the CPU into {n} devices needs the TensorFlow backend; Keras runs on "
            f"{keras.config.backend()}"
        )
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot split the CPU into {n} devices: TensorFlow's runtime has already started "
            f"with {max(1, len(current))}; split it before anything runs an op"
        ) from exc


def visible_devices() -> list[str]:
    """The devices a job may train on here, as the worker registers them: its GPUs when it
    has any ("GPU:0", ...), else its CPU devices ("CPU:0", or those split_cpu made)."""
    if keras.config.backend() != "tensorflow":
        from stepstream_service.engine.trainer import devices

        gpus = [d for d in devices() if d.startswith("GPU")]
        return gpus or ["CPU:0"]
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"GPU:{i}" for i in range(len(gpus))]
    # The configuration, not list_logical_devices: reading it does not start the runtime.
    cpu = tf.config.list_physical_devices("CPU")[0]
    return [f"CPU:{i}" for i in range(len(tf.config.get_logical_device_configuration(cpu) or [1]))]


def strategy(n: int, device: str = "auto"):
    """The MirroredStrategy over the first `n` GPUs, or, without that many (or with `device`
    "cpu"), over `n` logical CPU devices; NotEnoughDevices when neither is there. One per
    placement per process: a model kept between jobs keeps the strategy it was built under."""
    if keras.config.backend() != "tensorflow":
        raise NotEnoughDevices(
            f"runtime.devices > 1 needs the TensorFlow backend; this worker runs Keras on "
            f"{keras.config.backend()}"
        )
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")] if device != "cpu" else []
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")] if device != "gpu" else []
    for names in (gpus, cpus):
        if len(names) >= n:
            return _mirrored(tuple(names[:n]))
    held = gpus or cpus
    kind = {"gpu": " GPU", "cpu": " CPU"}.get(device, "")
    raise NotEnoughDevices(
        f"the job asks for {n}{kind} devices (runtime.devices); this worker has {len(held)}: "
        f"{', '.join(short(d) for d in held) or 'none'}"
    )


@functools.cache
def _mirrored(names: tuple[str, ...]):
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(names))


@dataclass(frozen=True)
class Cluster:
    """One rank of a job across workers: every rank's "host:port" (the chief's first), this
    process's rank, the GPUs it trains on (0: its CPU), and how long a collective waits on a
    peer before the attempt fails."""

    addresses: tuple[str, ...]
    rank: int
    gpus: int = 0
    timeout_seconds: float = 60.0


def multi_worker(cluster: Cluster):
    """The strategy of one rank. TensorFlow sets its collectives up once, before any other
    op, so a process makes it first and only once (runtime.gang runs each rank in a process of
    its own)."""
    import tensorflow as tf

    if cluster.gpus:
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) < cluster.gpus:
            raise NotEnoughDevices(
                f"the job asks for {cluster.gpus} GPUs on each worker; this one has {len(gpus)}"
            )
        tf.config.set_visible_devices(gpus[: cluster.gpus], "GPU")
    else:
        tf.config.set_visible_devices([], "GPU")
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(cluster.addresses)}),
        task_type="worker",
        task_id=cluster.rank,
        num_accelerators={"GPU": cluster.gpus} if cluster.gpus else None,
        rpc_layer="grpc",
    )
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=cluster.timeout_seconds
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )


def across_workers(distribution) -> bool:
    in_mode = getattr(distribution.extended, "_in_multi_worker_mode", None)
    return bool(in_mode and in_mode())


def build_locally(model: keras.Model, distribution) -> None:
    """Build `model` from one local replica's batch when fit or evaluate first needs it,
    instead of Keras's average of the batch across replicas (a collective that fails across
    workers, and needs equal shares)."""
    import tensorflow as tf

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return distribution.experimental_local_results(value)[0]
        return value

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = next(it)
                break
        with distribution.scope():
            model._symbolic_build(data_batch=tf.nest.map_structure(first, data_batch))

    model._maybe_symbolic_build = build


def test_function(model: keras.Model, distribution):
    """Keras's test function for `model` under `distribution`, one batch per call. The
    metrics it returns per batch are this process's; evaluate's final values are read from
    the metrics' variables, summed across every replica."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def function(iterator):
        outputs = distribution.run(model.test_step, args=(next(iterator),))
        return tf.nest.map_structure(lambda v: _local_mean(v, distribution), outputs)

    return function


def from_chief(distribution, variables: list, start: int) -> int:
    """Give every rank the chief's values of `variables` and its first step. Every rank has
    resumed (or forked) from the same checkpoint already, since loading one is a collective
    here; this makes sure they start alike even where a rank read something else, such as a
    copy of the checkpoint that failed its check."""
    import tensorflow as tf

    tensors = [tf.convert_to_tensor(v.value) for v in variables]
    tensors.append(tf.constant(start, tf.int64))
    # One batched all-reduce per dtype: a batch packs its tensors into one.
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)

    def chiefs(values):
        ctx = tf.distribute.get_replica_context()
        mine = tf.equal(ctx.replica_id_in_sync_group, 0)
        out = list(values)
        for indices in groups.values():
            kept = [tf.where(mine, values[i], tf.zeros_like(values[i])) for i in indices]
            summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, kept)
            for i, value in zip(indices, summed, strict=True):
                out[i] = value
        return out

    @tf.function
    def broadcast(values):
        return distribution.run(chiefs, args=(values,))

    reduced = [distribution.experimental_local_results(v)[0] for v in broadcast(tensors)]
    for variable, value in zip(variables, reduced[:-1], strict=True):
        variable.assign(value)
    return int(reduced[-1])


def agreed(distribution, flags: list[bool]) -> list[bool]:
    """Each flag true when it is true on any rank: every rank then stops (or not) at the
    same step, and none waits for a peer that has left."""
    import tensorflow as tf

    mine = tf.constant([int(f) for f in flags], tf.int32)
    return [bool(v) for v in _agreement(distribution)(mine).numpy()]


@functools.cache
def _agreement(distribution):
    """One traced all-reduce per strategy: run eagerly, each call would start threads of its
    own, and a long job runs out of them."""
    import tensorflow as tf

    @tf.function
    def function(mine):
        per_replica = distribution.run(lambda: tf.identity(mine))
        return distribution.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return function


def short(device: str) -> str:
    """ "/job:localhost/replica:0/task:0/device:CPU:1" as "CPU:1"."""
    return device.rsplit("device:", 1)[-1]


def strategy_devices(distribution) -> list[str]:
    """The devices a strategy's replicas run on, short names."""
    return [short(d) for d in distribution.extended.worker_devices]


def train_function(model: keras.Model, window: int, distribution):
    """Keras's train function for a compiled model under `distribution`, `window` steps per
    call, and the variable that says how many steps are left (set it before each fit).

    Keras's own loop of several steps per call fails under tf.distribute (it feeds the step
    an Optional inside a while loop: keras-team/keras#19246). This one is a plain loop of
    `strategy.run` over the iterator, which runs; it never reads past the steps left, so no
    step of a last, shorter window is lost.
    """
    import tensorflow as tf

    with tf.init_scope():  # one copy, outside the strategy: only the host reads it
        left = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_left")

    def step(data):
        outputs = distribution.run(model.train_step, args=(data,))
        return tf.nest.map_structure(lambda v: _local_mean(v, distribution), outputs)

    @tf.function(reduce_retracing=True)
    def function(iterator):
        n = tf.minimum(tf.constant(window, tf.int64), left)
        outputs = step(next(iterator))  # past the end: OutOfRange, which ends Keras's epoch
        for _ in tf.range(n - 1):
            outputs = step(next(iterator))
        left.assign_sub(n)
        return outputs

    return function, left


def _local_mean(value, distribution):
    """The mean over this process's replicas. The step recorders have already summed every
    replica's share (engine.step_record), and a reduce across workers here would cost a
    round trip per call."""
    import tensorflow as tf

    if not isinstance(value, tf.distribute.DistributedValues):
        return value
    return tf.reduce_mean(distribution.experimental_local_results(value), axis=0)
