"""One job on several devices of one machine, data-parallel (runtime.devices > 1).

TensorFlow's MirroredStrategy keeps a copy of the model on each device, splits every global
batch evenly between them and sums the gradients before each update, so N devices train the
job exactly as one device would at the same global batch. A machine without GPUs can split
its CPU into logical devices: slower than one device (they share the same cores), but the same
code path, which is what tests and small trials on a laptop need.

Only the TensorFlow backend: the Keras distribution API's TensorFlow side is a stub, and JAX's
is not what this service runs.
"""

from __future__ import annotations

import functools

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
    from keras.src.backend.tensorflow.trainer import reduce_per_replica

    with tf.init_scope():  # one copy, outside the strategy: only the host reads it
        left = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_left")

    def step(data):
        outputs = distribution.run(model.train_step, args=(data,))
        return reduce_per_replica(outputs, distribution, reduction="auto")

    @tf.function(reduce_retracing=True)
    def function(iterator):
        n = tf.minimum(tf.constant(window, tf.int64), left)
        outputs = step(next(iterator))  # past the end: OutOfRange, which ends Keras's epoch
        for _ in tf.range(n - 1):
            outputs = step(next(iterator))
        left.assign_sub(n)
        return outputs

    return function, left
