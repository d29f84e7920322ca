"""A model's shapes, parameters and activations, layer by layer, without a framework.

engine.footprint sizes a job from this before anything is allocated; each method follows the
Keras layer engine.registry builds (its variables, and what one example keeps for the backward
pass), and a test compares the parameters with Keras's count_params() for every layer name.
A size that does not fit is the model builder's to report: here the walk goes on with the
first input's shape, so an estimate never fails.
"""

from __future__ import annotations

import math

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec, LayerSpec

Shape = tuple[int, ...]


def _span(n: int, k: int, s: int, padding: str) -> int:
    """Output length of a convolution or pooling window over n steps."""
    if padding in ("same", "causal"):
        return max(math.ceil(n / s), 1)
    return max((n - k) // s + 1, 1)


class Stack:
    """Shapes through the layers, counting parameters and activations per example. `shape`
    is the current tensor's (without the batch); a graph sets it to each layer's input."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(d) for d in shape)
        self.params = 0
        self.trainable = 0
        self.largest = 0  # the largest variable, in parameters
        self.activations = math.prod(self.shape)  # the input batch itself

    def _vars(self, *sizes: int, frozen: int = 0) -> None:
        total = sum(sizes)
        self.params += total + frozen
        self.trainable += total
        self.largest = max(self.largest, *sizes, frozen)

    def _out(self, shape: tuple[int, ...], kept: int = 0) -> None:
        self.shape = shape
        self.activations += math.prod(shape) + kept

    # ------------------------------------------------------------ dense and normalization

    def dense(self, units: int) -> None:
        self._vars(self.shape[-1] * units, units)
        self._out((*self.shape[:-1], units))

    def batch_norm(self) -> None:
        c = self.shape[-1]
        self._vars(c, c, frozen=2 * c)  # gamma, beta; the moving mean and variance
        self._out(self.shape)

    def layer_norm(self) -> None:
        """layer_normalization and group_normalization: a scale and an offset per channel."""
        c = self.shape[-1]
        self._vars(c, c)
        self._out(self.shape)

    def dropout(self) -> None:
        self._out(self.shape)  # its mask

    def elementwise(self) -> None:
        """A layer that maps each value on its own (activation, rescaling, random_flip ...)."""
        self._out(self.shape)

    def flatten(self) -> None:
        self.shape = (math.prod(self.shape),)  # a view: nothing new is kept

    def reshape(self, target: list[int]) -> None:
        size = math.prod(self.shape)
        known = math.prod(d for d in target if d != -1)
        self.shape = tuple(max(size // max(known, 1), 1) if d == -1 else d for d in target)

    # ------------------------------------------------------------ convolutions and pooling

    def conv2d(self, filters: int, kernel: int, strides: int, padding: str) -> None:
        if len(self.shape) != 3:
            return
        h, w, c = self.shape
        self._vars(kernel * kernel * c * filters, filters)
        self._out((_span(h, kernel, strides, padding), _span(w, kernel, strides, padding), filters))

    def conv1d(self, filters: int, kernel: int, strides: int, padding: str) -> None:
        if len(self.shape) != 2:
            return
        n, c = self.shape
        self._vars(kernel * c * filters, filters)
        self._out((_span(n, kernel, strides, padding), filters))

    def conv2d_transpose(self, filters: int, kernel: int, strides: int, padding: str) -> None:
        if len(self.shape) != 3:
            return
        h, w, c = self.shape
        self._vars(kernel * kernel * c * filters, filters)

        def grown(n: int) -> int:
            return n * strides if padding == "same" else n * strides + max(kernel - strides, 0)

        self._out((grown(h), grown(w), filters))

    def depthwise_conv(self, kernel: int, strides: int, padding: str, multiplier: int) -> None:
        """depthwise_conv1d or depthwise_conv2d, by the input's rank: one kernel per channel."""
        if len(self.shape) not in (2, 3):
            return
        *steps, c = self.shape
        self._vars(kernel ** len(steps) * c * multiplier, c * multiplier)
        spans = tuple(_span(n, kernel, strides, padding) for n in steps)
        self._out((*spans, c * multiplier))

    def separable_conv(
        self, filters: int, kernel: int, strides: int, padding: str, multiplier: int
    ) -> None:
        """separable_conv1d or separable_conv2d: a depthwise kernel, then a 1x1 convolution."""
        if len(self.shape) not in (2, 3):
            return
        *steps, c = self.shape
        self._vars(kernel ** len(steps) * c * multiplier, c * multiplier * filters, filters)
        spans = tuple(_span(n, kernel, strides, padding) for n in steps)
        self._out((*spans, filters), kept=math.prod(spans) * c * multiplier)

    def max_pool(self, pool: int, strides: int | None, padding: str) -> None:
        if len(self.shape) != 3:
            return
        h, w, c = self.shape
        s = strides or pool
        self._out((_span(h, pool, s, padding), _span(w, pool, s, padding), c))

    def pool(self, pool: int, strides: int | None, padding: str) -> None:
        """Max or average pooling, 1d or 2d by the input's rank."""
        if len(self.shape) not in (2, 3):
            return
        *steps, c = self.shape
        s = strides or pool
        self._out((*(_span(n, pool, s, padding) for n in steps), c))

    def global_pool(self) -> None:
        self._out((self.shape[-1],))

    def upsampling(self, size: int) -> None:
        """upsampling1d or upsampling2d: each step (or pixel) repeated `size` times."""
        *steps, c = self.shape
        self._out((*(n * size for n in steps), c))

    def crop(self, height: int, width: int) -> None:
        if len(self.shape) == 3:
            self._out((height, width, self.shape[-1]))

    # ------------------------------------------------------------ sequences

    def embedding(self, vocab: int, dim: int) -> None:
        self._vars(vocab * dim)
        self._out((*self.shape, dim))

    def position_embedding(self) -> None:
        """A learned vector per step, added to a sequence."""
        self._vars(math.prod(self.shape))
        self._out(self.shape)

    def rnn(
        self,
        cell: str,
        units: int,
        sequences: bool,
        bidirectional: bool = False,
        merge_mode: str = "concat",
    ) -> None:
        if len(self.shape) != 2:
            return
        steps, d = self.shape
        gates = {"lstm": 4, "gru": 3, "simple_rnn": 1}[cell]
        biases = 2 * gates * units if cell == "gru" else gates * units  # GRU: reset_after
        directions = 2 if bidirectional else 1
        for _ in range(directions):
            self._vars(d * gates * units, units * gates * units, biases)
        width = units * directions if merge_mode == "concat" else units
        # Every step's gates are kept for the backward pass through time.
        kept = steps * gates * units * directions
        self._out((steps, width) if sequences else (width,), kept)

    def attention(
        self, heads: int, key_dim: int, value: Shape | None = None, key: Shape | None = None
    ) -> None:
        """multi_head_attention with the current shape as its query; value and key default to
        the query (self-attention), as Keras's do."""
        query = self.shape
        value = value or query
        key = key or value
        if min(len(query), len(value), len(key)) < 2:
            return
        width = heads * key_dim
        q, k, v = query[-1], key[-1], value[-1]
        # The query, key and value projections (kernel and bias each), and the output's.
        self._vars(q * width, width, k * width, width, v * width, width, width * q, q)
        tq, tk = math.prod(query[:-1]), math.prod(key[:-1])
        # Projections, the attention scores and their softmax, and the heads' combined output.
        kept = tq * width + 2 * tk * width + 2 * heads * tq * tk + tq * width
        self._out(query, kept)

    # ------------------------------------------------------------ merges

    def merge(self, kind: str, shapes: list[Shape], axis: int = -1) -> None:
        """add, multiply (elementwise, with Keras's broadcasting of size-1 axes) or
        concatenate (along `axis`) of `shapes`."""
        first = shapes[0]
        if any(len(s) != len(first) for s in shapes):
            self._out(first)
            return
        if kind == "concatenate":
            at = axis - 1 if axis > 0 else axis  # the spec's axes count the batch
            if not -len(first) <= at < len(first):
                self._out(first)
                return
            out = list(first)
            out[at] = sum(s[at] for s in shapes)
            self._out(tuple(out))
            return
        self._out(tuple(max(dims) for dims in zip(*shapes, strict=True)))


def layers(stack: Stack, spec: JobSpec, vocab: int | None) -> None:
    """The `layers` architecture on shapes, as engine.models builds it: each layer from its
    inputs' shapes, and the output layer's input flattened."""
    model = spec.model
    sequences = model.returns_sequences()
    start = stack.shape
    shapes: list[Shape] = []
    for i, (layer, sources) in enumerate(zip(model.layers, model.sources(), strict=True)):
        inputs = [start if j < 0 else shapes[j] for j in sources]
        stack.shape = inputs[0]
        _layer(stack, layer, inputs, sequences[i], vocab)
        shapes.append(stack.shape)
    stack.shape = shapes[model.output_index]
    if len(stack.shape) > 1:
        stack.flatten()


_ELEMENTWISE = frozenset(
    {
        "activation",
        "random_contrast",
        "random_flip",
        "random_rotation",
        "random_zoom",
        "rescaling",
    }
)
_POOLS = frozenset({"average_pool1d", "average_pool2d", "max_pool1d", "max_pool2d"})


def _layer(
    stack: Stack, layer: LayerSpec, inputs: list[Shape], sequences: bool, vocab: int | None
) -> None:
    kind = layer.type
    kernel, strides, padding = layer.kernel_size or 3, layer.strides or 1, layer.padding or "valid"
    if kind == "dense":
        stack.dense(layer.units or 1)
    elif kind == "batch_normalization":
        stack.batch_norm()
    elif kind in ("layer_normalization", "group_normalization"):
        stack.layer_norm()
    elif kind == "dropout":
        stack.dropout()
    elif kind in _ELEMENTWISE:
        stack.elementwise()
    elif kind == "flatten":
        stack.flatten()
    elif kind == "reshape":
        stack.reshape(layer.target_shape or [-1])
    elif kind == "conv2d":
        stack.conv2d(layer.filters or 1, kernel, strides, padding)
    elif kind == "conv1d":
        stack.conv1d(layer.filters or 1, kernel, strides, padding)
    elif kind == "conv2d_transpose":
        stack.conv2d_transpose(layer.filters or 1, kernel, strides, padding)
    elif kind in ("depthwise_conv1d", "depthwise_conv2d"):
        stack.depthwise_conv(kernel, strides, padding, layer.depth_multiplier or 1)
    elif kind in ("separable_conv1d", "separable_conv2d"):
        stack.separable_conv(
            layer.filters or 1, kernel, strides, padding, layer.depth_multiplier or 1
        )
    elif kind in _POOLS:
        stack.pool(layer.pool_size or 2, layer.strides, padding)
    elif kind.startswith("global_"):
        stack.global_pool()
    elif kind in ("upsampling1d", "upsampling2d"):
        stack.upsampling(layer.size or 2)
    elif kind == "random_crop":
        stack.crop(layer.height or 1, layer.width or 1)
    elif kind == "embedding":
        stack.embedding(vocab or 2, layer.output_dim or 32)
        if layer.positional:
            stack.position_embedding()
    elif kind == "position_embedding":
        stack.position_embedding()
    elif kind in names.RNN_CELLS:
        stack.rnn(kind, layer.units or 1, sequences)
    elif kind == "bidirectional":
        stack.rnn(
            layer.cell or "lstm", layer.units or 1, sequences, True, layer.merge_mode or "concat"
        )
    elif kind == "multi_head_attention":
        value = inputs[1] if len(inputs) > 1 else None
        key = inputs[2] if len(inputs) > 2 else None
        stack.attention(layer.num_heads or 1, layer.key_dim or 1, value, key)
    elif kind in names.MERGE_LAYERS:
        stack.merge(kind, inputs, layer.axis if layer.axis is not None else -1)
