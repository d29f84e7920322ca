"""Per-step loss and accuracy kept on the device and fetched once per window of steps.

A Keras callback that reads values every step forces a device-to-host sync each step and costs a
third of the throughput of a small model. Instead, a metric writes each step's batch loss and
batch accuracy (or mae) into a ring buffer inside the compiled training loop, and returns the
whole buffer as its result. Keras hands that result to callbacks once per `steps_per_execution`
window, so the host fetches `window` values in one transfer. Being a metric, it works the same
on the TensorFlow, JAX and PyTorch backends.

Under a tf.distribute strategy of several replicas (runtime.devices > 1) each replica sees only
its share of the batch. There every replica sums its share's loss and hits across the replicas
in the step, so each holds the global step's values, and reads return those, not variables
(a replicated variable read outside the step would sum the replicas' copies).
"""

from __future__ import annotations

import keras
from keras import ops

STEP_LOSSES = "step_losses"
STEP_VALUES = "step_values"
STEP_COUNT = "step_count"


class StepRecorder(keras.metrics.Metric):
    """value: "sparse_accuracy" (integer labels), "argmax_accuracy" (one-hot labels),
    "binary_accuracy" (one output unit, cut at `threshold`), "mae" (regression) or "none"."""

    def __init__(
        self, loss_fn, value: str, window: int, threshold: float = 0.5, suffix: str = "", **kwargs
    ):
        # suffix: the result's keys for a model's second and later outputs (the caller adds
        # their losses to the first's, the total loss); Keras merges every metric's dict.
        super().__init__(name=f"steps{suffix}", **kwargs)
        self.suffix = suffix
        self.loss_fn = loss_fn
        self.value = value
        self.window = int(window)
        self.threshold = float(threshold)
        # Fixed when built: a model is built and traced under one strategy (engine.trainer).
        self.replicated = _replicas() > 1
        # Every replica holds the same values (see update_state): a read takes their mean, an
        # assignment from outside the step (the trainer zeroing the count) sets each.
        extra = {"aggregation": "mean"} if self.replicated else {}
        first = {"aggregation": "only_first_replica"} if self.replicated else {}
        self.losses_buf = self.add_variable(
            (self.window,), "zeros", "float32", name="losses", **extra
        )
        self.values_buf = self.add_variable(
            (self.window,), "zeros", "float32", name="values", **extra
        )
        self.count = self.add_variable((), "zeros", "int32", name="count", **first)

    def _scores(self, y_true, y_pred):
        """What the step value averages: each example's hit, or each output's absolute error."""
        if self.value == "mae":
            y_true = ops.reshape(ops.cast(y_true, "float32"), ops.shape(y_pred))
            return ops.abs(y_true - y_pred)
        if self.value == "sparse_accuracy":
            hit = ops.argmax(y_pred, axis=-1) == ops.reshape(ops.cast(y_true, "int32"), (-1,))
        elif self.value == "binary_accuracy":
            hit = (y_pred > self.threshold) == (ops.cast(y_true, "float32") > 0.5)
        else:
            hit = ops.argmax(y_pred, axis=-1) == ops.argmax(y_true, axis=-1)
        return ops.cast(hit, "float32")

    def _batch_value(self, y_true, y_pred):
        if self.value == "none":  # a later output's recorder: its loss only
            return ops.zeros((), "float32")
        return ops.mean(self._scores(y_true, y_pred))

    def _global(self, loss, y_true, y_pred):
        """The step's loss and value over every replica's share, in one all-reduce. The loss
        each replica computes is already its share's mean over the replica count (Keras scales
        it so that summed gradients are the global ones); summed, it is the loss Keras trains
        on. The value is weighted by each share's size, which differ in an epoch's last batch
        (a share may even be empty)."""
        import tensorflow as tf

        replica = tf.distribute.get_replica_context()
        if replica is None:  # Keras's build of the metrics, outside any step
            return loss, self._batch_value(y_true, y_pred)
        if self.value == "none":
            total, size = ops.zeros((), "float32"), ops.ones((), "float32")
        else:
            scores = self._scores(y_true, y_pred)
            total = ops.sum(scores)
            size = ops.cast(ops.size(scores), "float32")
        summed = replica.all_reduce("sum", ops.stack([loss, total, size]))
        return summed[0], ops.divide_no_nan(summed[1], summed[2])

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(y_pred, "float32")
        # The batch loss is computed a second time here: Keras hands metrics the predictions,
        # not the loss (that sits in its private loss tracker). It is one small reduction per
        # step, inside bench/overhead.py's measured 0.97 of bare Keras.
        loss = ops.cast(self.loss_fn(y_true, y_pred), "float32")
        if self.replicated:
            loss, value = self._global(loss, y_true, y_pred)
        else:
            value = self._batch_value(y_true, y_pred)
        # `.value` everywhere: JAX refuses a Variable where it expects an array.
        count = self.count.value
        slot = ops.expand_dims(ops.mod(count, self.window), 0)
        for buf, new in ((self.losses_buf, loss), (self.values_buf, value)):
            buf.assign(ops.slice_update(buf.value, slot, ops.reshape(new, (1,))))
        self.count.assign(count + 1)

    def reset_state(self):
        # Keras resets metrics every epoch; the step history must run across epochs.
        pass

    def result(self):
        read = ops.convert_to_tensor if self.replicated else lambda v: v
        if self.suffix:
            return {f"{STEP_LOSSES}{self.suffix}": read(self.losses_buf.value)}
        return {
            STEP_LOSSES: read(self.losses_buf.value),
            STEP_VALUES: read(self.values_buf.value),
            STEP_COUNT: read(self.count.value),
        }


def _replicas() -> int:
    """The replicas of the tf.distribute strategy in scope (1 without one, or on another
    backend)."""
    if keras.config.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
