"""The train step of one process among several (keras.distribution.DataParallel).

The fused train step (trainer.train_graph) is split in two programs with one in-place
all-reduce between them:

    gradients        this process's rows → its share of the loss, metric sums,
                     gradients and moving-statistic updates, all in one float32 buffer
    all-reduce       the buffer summed over the processes (torch.distributed, gloo)
    apply_gradients  weights, optimizer slots, summed gradients → new weights and slots

The buffer's layout does not depend on the batch size, so a process whose slice of a
(ragged last) batch is empty zeroes it and still joins the sum. Weights and slots keep
trainer.TrainState's two alternating sets.
"""

from __future__ import annotations

import numpy as np

from frontends.keras import utils
from frontends.keras.distribution import DistributedError, ProcessGroup
from frontends.keras.trainer import (
    Feed,
    Target,
    TrainState,
    _compile,
    _names,
    aligned_offsets,
    gradient_graph,
    update_graph,
)

#: floats (64 bytes, a cache line): where each array of the gradient buffer starts
GRADIENT_ALIGN = 16


def gradient_layout(sizes: list[int]) -> tuple[list[int], int]:
    """The gradient buffer of arrays of these sizes (floats): each one's offset, and the
    buffer's length (a whole number of GRADIENT_ALIGN). The C training library's split
    step lays its buffer out the same way."""
    offsets, end = aligned_offsets(sizes, GRADIENT_ALIGN)
    return offsets, -(-end // GRADIENT_ALIGN) * GRADIENT_ALIGN


def _buffer(shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One float32 buffer holding arrays of these shapes, and a view of each."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    offsets, length = gradient_layout(sizes)
    flat = np.zeros(max(length, 1), np.float32)
    views = [flat[o : o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes)]
    return flat, views


class DataParallelStep:
    """The split train step of one model, bound to the training state and a gradient
    buffer: `run` trains on this process's rows of one global batch."""

    def __init__(self, model, state: TrainState, group: ProcessGroup):
        self.model, self.state, self.group = model, state, group
        weights = model.weights
        targets = model._targets(1)
        several = len(targets) > 1
        # the layout and the masks do not depend on the batch size: read them off batch 1
        _, masks, self.layout = gradient_graph(model._forward, weights, model._feeds(1), targets, several)
        self.mask_rows = [(layer, shape[1:]) for layer, shape in masks]
        self.loss_names, self.metric_names = _names(targets, several)
        n_parts, n_sums = len(self.loss_names), len(self.metric_names)
        summed_weights = [*self.layout.reached, *self.layout.updated]
        shapes = [()] * (1 + n_parts + n_sums) + [w.shape for w in summed_weights]
        self.buffer, self.results = _buffer(shapes)
        self.loss, *rest = self.results[: 1 + n_parts + n_sums]
        self.losses, self.metric_sums = rest[:n_parts], rest[n_parts:]
        summed = self.results[1 + n_parts + n_sums :]
        optimizer = model.optimizer
        apply = _compile(update_graph(weights, optimizer, self.layout), "apply_gradients", "cpu")
        self.scalars = {s: np.zeros((), np.float32) for s in optimizer.scalars}
        self.apply = [
            apply.bind(state.sets[write], *state.sets[read], *summed, *self.scalars.values())
            for read, write in ((0, 1), (1, 0))
        ]
        self._gradients: dict[int, _GradientCall] = {}

    def _gradient_call(self, rows: int) -> _GradientCall:
        if rows not in self._gradients:
            self._gradients[rows] = _GradientCall(self, rows)
        return self._gradients[rows]

    def run(self, xs: list[np.ndarray], ys: list[np.ndarray], idx: np.ndarray, step: int) -> None:
        """One step on the global batch `idx` (rows of xs and ys): this process computes
        its slice, the buffer is summed, every process applies the same update. Dropout
        masks are drawn for the whole global batch on every process (the generator
        stays in step everywhere, as one process would draw them), each keeping its rows."""
        rows = self.group.rows(len(idx))
        mine = idx[rows]
        full_masks = [layer.draw_mask(utils.rng(), (len(idx), *shape)) for layer, shape in self.mask_rows]
        current = self.state.current
        if len(mine):
            call = self._gradient_call(len(mine))
            for src, dst in zip([*xs, *ys], [*call.xs, *call.ys]):
                np.take(src, mine, axis=0, out=dst)
            for full, dst in zip(full_masks, call.masks):
                dst[...] = full[rows]
            call.share[...] = len(mine) / len(idx)
            call.calls[current]()
        else:
            self.buffer[...] = 0
        self.group.all_reduce(self.buffer, f"the all-reduce of step {step}'s gradients")
        for name, value in self.model.optimizer.step_scalars().items():
            self.scalars[name][...] = value
        self.apply[current]()
        self.state.advance()


class _GradientCall:
    """The gradient program for one slice size, bound to its staging arrays and the
    step's gradient buffer (one call per weight set)."""

    def __init__(self, step: DataParallelStep, rows: int):
        model = step.model
        feeds: list[Feed] = model._feeds(rows)
        targets: list[Target] = model._targets(rows)
        graph, masks, layout = gradient_graph(model._forward, model.weights, feeds, targets, len(targets) > 1)
        assert layout == step.layout, "the gradient buffer's layout changed with the batch size"
        program = _compile(graph, "gradients", "cpu")
        self.xs = [np.zeros(f.shape, f.dtype) for f in feeds]
        self.ys = [np.zeros(t.y.shape, t.y.dtype) for t in targets]
        self.masks = [np.ones(shape, np.float32) for _, shape in masks]
        self.share = np.zeros((), np.float32)
        n = step.state.n_weights
        self.calls = [
            program.bind(step.results, *self.xs, *self.ys, *self.masks, *weights[:n], self.share)
            for weights in step.state.sets
        ]


def _signature(model, fit_args: dict) -> dict:
    """What every process must agree on to train one model together."""
    optimizer = model.optimizer
    return {
        "weights": [(w.name, tuple(w.shape)) for w in model.weights],
        "optimizer": (type(optimizer).__name__, optimizer.get_config(), optimizer.iterations),
        "loss": [type(t.loss).__name__ for t in model._targets(1)],
        **fit_args,
    }


def start(model, group: ProcessGroup, fit_args: dict) -> None:
    """Before the first step: every process checks that the others train the same model
    the same way (naming the first difference), then takes process 0's weights,
    optimizer slots and random generator, so that shuffles and dropout masks agree."""
    mine = _signature(model, fit_args)
    everyone = group.all_gather_object(mine, "comparing the processes' models")
    for rank, theirs in enumerate(everyone):
        for key in mine:
            if theirs.get(key) != everyone[0].get(key):
                raise DistributedError(
                    f"process {rank} differs from process 0 in {key}: {theirs.get(key)!r} vs "
                    f"{everyone[0].get(key)!r}; every process must build the same model and call "
                    "fit with the same arguments and data sizes"
                )
    utils.set_rng_state(group.broadcast_object(utils.rng().bit_generator.state, "sharing the seed"))
    for a in model._state.arrays():
        group.broadcast(a, "broadcasting process 0's weights")
