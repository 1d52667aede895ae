"""Reductions and the ops built around one: reduce_*, softmax, log_softmax, layer_norm."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from math import prod
from typing import TYPE_CHECKING

import numpy as np

from codegen.kir import (
    Expr,
    KernelBuilder,
    LoopKind,
    const,
    logical_and,
    logical_or,
    maximum,
    minimum,
    select,
)
from codegen.kir import ExprBuilder as e
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import Fusion, Gradient, Grads, Op, normalize_axis, register
from ir.ops.grad import constant, expand_back
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder


def _float(op: str, x: TensorType) -> None:
    if x.dtype not in ("float32", "float64"):
        raise GraphError(f"{op}: input must be float, got {x.dtype}")


def _split(shape: tuple[int, ...], axis: int, end: int | None = None) -> tuple[int, int, int]:
    """(outer, n, inner): the elements before, along [axis, end), and after."""
    end = axis + 1 if end is None else end
    return prod(shape[:axis]), prod(shape[axis:end]), prod(shape[end:])


@dataclasses.dataclass(frozen=True)
class Reduce(Op):
    axes: tuple[int, ...] | None = None  # None: all axes
    keepdims: bool = True
    accepts = ("float32", "float64", "int64", "int32")
    accepts_epilogue = True
    accepts_prologue = True

    def _axes(self, rank: int) -> tuple[int, ...]:
        if self.axes is None:
            return tuple(range(rank))
        axes = tuple(sorted({normalize_axis(self.name, a, rank) for a in self.axes}))
        if len(axes) != len(self.axes):
            raise GraphError(f"{self.name}: repeated axis in {self.axes}")
        return axes

    def infer(self, x: TensorType) -> TensorType:
        if x.dtype not in self.accepts:
            raise GraphError(f"{self.name}: dtype {x.dtype} not accepted")
        axes = self._axes(x.rank)
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if self.keepdims or i not in axes)
        return x.with_shape(shape)

    def lower(self, k: KernelBuilder, ins, out, epilogue=None) -> None:
        """One accumulator per output element; the reduced axes are loops inside it."""
        x = ins[0]
        axes = self._axes(len(x.shape))
        kept = [i for i in range(len(x.shape)) if i not in axes]
        strides = [prod(x.shape[i + 1 :]) for i in range(len(x.shape))]
        kept_view = out.view(tuple(x.shape[i] for i in kept) or (1,))
        with k.nest(kept_view.shape) as idx:
            offset: Expr = const(0, "int64")
            for axis, v in zip(kept, idx):
                offset = v * strides[axis] + offset
            acc = k.local(x.dtype, self.init(x.dtype))
            with ExitStack() as loops:
                for a in axes:
                    kind = LoopKind.VECTOR if a == axes[-1] else LoopKind.SERIAL
                    offset = loops.enter_context(k.loop(x.shape[a], kind, "red")) * strides[a] + offset
                k.assign(acc, self.combine(acc.ref, x.load_flat(offset)), reduction=True)
            result = self.finish(acc.ref, prod(x.shape[a] for a in axes))
            if epilogue is not None:
                result = epilogue(result, kept_view.offset(idx), None)
            k.store(kept_view, idx, result)

    def init(self, dtype: str) -> float:
        return 0.0

    def finish(self, acc: Expr, count: int) -> Expr:
        return acc


@register("reduce_sum", Fusion.REDUCTION)
class ReduceSum(Reduce):
    gpu_per_iteration = True
    row_reduction = True

    def reference(self, x):
        return np.sum(x, axis=self._axes(x.ndim), keepdims=self.keepdims, dtype=x.dtype)

    def combine(self, acc, v):
        return acc + v

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        return [expand_back(b, g, x, self.axes, self.keepdims)]


@register("reduce_mean", Fusion.REDUCTION)
class ReduceMean(Reduce):
    gpu_per_iteration = True
    row_reduction = True
    accepts = ("float32", "float64")

    def reference(self, x):
        return np.mean(x, axis=self._axes(x.ndim), keepdims=self.keepdims, dtype=x.dtype)

    def combine(self, acc, v):
        return acc + v

    def finish(self, acc, count):
        return acc / float(count)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        count = x.type.numel // max(node.outputs[0].type.numel, 1)
        scaled = b.mul(g, constant(b, 1.0 / count, g))
        return [expand_back(b, scaled, x, self.axes, self.keepdims)]


class ReduceExtremum(Reduce):
    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """The gradient goes to the elements equal to the result, shared among ties."""
        x, axes, keep = node.inputs[0], self.axes, self.keepdims
        y = expand_back(b, node.outputs[0], x, axes, keep)
        hit = b.cast(b.equal(x, y), to=x.type.dtype)
        ties = expand_back(b, b.reduce_sum(hit, axes=axes, keepdims=keep), x, axes, keep)
        return [b.div(b.mul(expand_back(b, g, x, axes, keep), hit), ties)]


@register("reduce_max", Fusion.REDUCTION)
class ReduceMax(ReduceExtremum):
    gpu_per_iteration = True
    row_reduction = True
    accepts = (*Reduce.accepts, "bool")  # bool: any

    def reference(self, x):
        return np.max(x, axis=self._axes(x.ndim), keepdims=self.keepdims, initial=self.init(x.dtype.name))

    def init(self, dtype):
        if dtype == "bool":
            return False
        return -np.inf if dtype.startswith("float") else int(np.iinfo(dtype).min)

    def combine(self, acc, v):
        return logical_or(acc, v) if v.dtype == "bool" else maximum(acc, v)


@register("reduce_min", Fusion.REDUCTION)
class ReduceMin(ReduceExtremum):
    gpu_per_iteration = True
    accepts = (*Reduce.accepts, "bool")  # bool: all

    def reference(self, x):
        return np.min(x, axis=self._axes(x.ndim), keepdims=self.keepdims, initial=self.init(x.dtype.name))

    def init(self, dtype):
        if dtype == "bool":
            return True
        return np.inf if dtype.startswith("float") else int(np.iinfo(dtype).max)

    def combine(self, acc, v):
        return logical_and(acc, v) if v.dtype == "bool" else minimum(acc, v)


@register("reduce_prod", Fusion.REDUCTION)
class ReduceProd(Reduce):
    gpu_per_iteration = True

    def reference(self, x):
        return np.prod(x, axis=self._axes(x.ndim), keepdims=self.keepdims, dtype=x.dtype)

    def init(self, dtype):
        return 1.0 if dtype.startswith("float") else 1

    def combine(self, acc, v):
        return acc * v

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """∂(∏x)/∂x_i = ∏x / x_i (for x_i ≠ 0)."""
        x = node.inputs[0]
        y = expand_back(b, node.outputs[0], x, self.axes, self.keepdims)
        return [b.div(b.mul(expand_back(b, g, x, self.axes, self.keepdims), y), x)]


@register("arg_reduce", Fusion.REDUCTION)
class ArgReduce(Op):
    """The index (int64) of the largest (`largest`) or smallest value along `axis`; ties
    go to the first index, or the last with select_last_index; NaN counts as largest."""

    gpu_per_iteration = True

    differentiation = Gradient.ZERO
    axis: int = 0
    keepdims: bool = True
    largest: bool = True
    select_last_index: bool = False

    def infer(self, x: TensorType) -> TensorType:
        a = normalize_axis("arg_reduce", self.axis, x.rank)
        if x.shape[a] == 0:
            raise GraphError(f"arg_reduce: axis {self.axis} is empty in {x.shape}")
        shape = tuple(1 if i == a else d for i, d in enumerate(x.shape) if self.keepdims or i != a)
        return TensorType("int64", shape)

    def reference(self, x):
        a = normalize_axis("arg_reduce", self.axis, x.ndim)
        y = x if self.largest else -x if x.dtype.kind == "f" else -x.astype(np.int64)
        if self.select_last_index:
            idx = y.shape[a] - 1 - np.argmax(np.flip(y, axis=a), axis=a)
        else:
            idx = np.argmax(y, axis=a)
        return np.expand_dims(idx, a).astype(np.int64) if self.keepdims else idx.astype(np.int64)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        a = normalize_axis("arg_reduce", self.axis, len(x.shape))
        outer, n, inner = _split(x.shape, a)
        with k.loop(outer * inner, LoopKind.PARALLEL, "r") as r:
            base = r // inner * (n * inner) + r % inner
            best = k.local(x.dtype, x.load_flat(base), "best")
            where = k.local("int64", 0, "at")
            with k.loop(n, LoopKind.SERIAL, "j") as j:
                v = x.load_flat(base + j * inner)
                if x.dtype.startswith("float"):
                    wins = v.ge(best.ref) if self.select_last_index else v.gt(best.ref)
                    loses = v.le(best.ref) if self.select_last_index else v.lt(best.ref)
                    nan_first = logical_and(v.ne(v), best.ref.eq(best.ref))
                    better = logical_or(wins if self.largest else loses, nan_first)
                else:
                    op = (
                        ("ge" if self.select_last_index else "gt")
                        if self.largest
                        else ("le" if self.select_last_index else "lt")
                    )
                    better = getattr(v, op)(best.ref)
                wins = k.local("bool", better, "wins")  # decided before best changes
                k.assign(best, select(wins.ref, v, best.ref))
                k.assign(where, select(wins.ref, j, where.ref))
            k.store(out.view((outer * inner,)), [r], where.ref)


@register("topk", Fusion.REDUCTION)
class TopK(Op):
    """The k largest (or smallest) values along `axis`, in order, or (output="indices")
    their int64 indices. Equal values keep their order (the lower index first), as ONNX
    TopK defines; NaN is not ordered."""

    gpu_per_iteration = True

    k: int = 1
    axis: int = -1
    largest: bool = True
    output: str = "values"

    def infer(self, x: TensorType) -> TensorType:
        a = normalize_axis("topk", self.axis, x.rank)
        if not 0 <= self.k <= x.shape[a]:
            raise GraphError(f"topk: k={self.k} is outside [0, {x.shape[a]}] for axis {self.axis} of {x}")
        if self.output not in ("values", "indices"):
            raise GraphError(f"topk: output must be 'values' or 'indices', got {self.output!r}")
        shape = tuple(self.k if i == a else d for i, d in enumerate(x.shape))
        return TensorType(x.dtype if self.output == "values" else "int64", shape)

    def reference(self, x):
        a = normalize_axis("topk", self.axis, x.ndim)
        key = x if not self.largest else -x if x.dtype.kind == "f" else -x.astype(np.int64)
        order = np.take(np.argsort(key, axis=a, kind="stable"), np.arange(self.k), axis=a)
        return np.take_along_axis(x, order, axis=a) if self.output == "values" else order.astype(np.int64)

    def lower(self, k, ins, out, epilogue=None):
        """Each element's rank is the number of elements that come before it; the k
        ranked first are stored at their rank. O(n²) per row, branch-free inner loop."""
        x = ins[0]
        a = normalize_axis("topk", self.axis, len(x.shape))
        outer, n, inner = _split(x.shape, a)
        with k.loop(outer * inner, LoopKind.PARALLEL, "r") as r:
            base = r // inner * (n * inner) + r % inner
            out_base = r // inner * (self.k * inner) + r % inner
            with k.loop(n, LoopKind.SERIAL, "j") as j:
                v = k.local(x.dtype, x.load_flat(base + j * inner), "v")
                rank = k.local("int64", 0, "rank")
                with k.loop(n, LoopKind.VECTOR, "m") as m:
                    other = x.load_flat(base + m * inner)
                    ahead = other.gt(v.ref) if self.largest else other.lt(v.ref)
                    before = logical_or(ahead, logical_and(other.eq(v.ref), m.lt(j)))
                    k.assign(rank, rank.ref + select(before, const(1, "int64"), 0), reduction=True)
                with k.when(rank.ref.lt(self.k)):
                    k.store(out, out_base + rank.ref * inner, v.ref if self.output == "values" else j)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """The values are x gathered at the indices: their gradient goes back to those places."""
        if self.output != "values":
            return [None]
        x = node.inputs[0]
        indices = b.topk(x, k=self.k, axis=self.axis, largest=self.largest, output="indices")
        return [b.gather_elements_backward(indices, g, shape=x.type.shape, axis=self.axis)]


@dataclasses.dataclass(frozen=True)
class AxisSoftmax(Op):
    axis: int = -1
    accepts_epilogue = True
    accepts_prologue = True

    def infer(self, x: TensorType) -> TensorType:
        _float(self.name, x)
        normalize_axis(self.name, self.axis, x.rank)
        return x

    def _max_and_sum(self, k: KernelBuilder, x, out, n: int, at) -> tuple[Expr, Expr]:
        """Row max, then sum of exp(x - max), writing exp(x - max) to out on the way."""
        m = k.local(x.dtype, -np.inf, "max")
        with k.loop(n, LoopKind.VECTOR, "j") as j:
            k.assign(m, maximum(m.ref, x.load_flat(at(j))), reduction=True)
        s = k.local(x.dtype, 0.0, "sum")
        with k.loop(n, LoopKind.VECTOR, "j") as j:
            ex = k.local(x.dtype, e.exp(x.load_flat(at(j)) - m.ref), "exp")
            if self.stores_exp:
                k.store(out, at(j), ex.ref)
            k.assign(s, s.ref + ex.ref, reduction=True)
        return m.ref, s.ref

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        outer, n, inner = _split(x.shape, normalize_axis(self.name, self.axis, len(x.shape)))
        with k.loop(outer * inner, LoopKind.PARALLEL, "row") as r:
            base = r // inner * (n * inner) + r % inner

            def at(j, base=base):
                return base + j * inner

            m, s = self._max_and_sum(k, x, out, n, at)
            self.normalize(k, x, out, n, at, m, s, epilogue or (lambda v, _flat, _multi: v))


@register("softmax", Fusion.REDUCTION)
class Softmax(AxisSoftmax):
    gpu_per_iteration = True
    stores_exp = True

    def reference(self, x):
        ex = np.exp(x - x.max(axis=self.axis, keepdims=True))
        return ex / ex.sum(axis=self.axis, keepdims=True)

    def normalize(self, k, x, out, n, at, m, s, epilogue):
        inv = 1.0 / s
        with k.loop(n, LoopKind.VECTOR, "j") as j:
            k.store(out, at(j), epilogue(out.load_flat(at(j)) * inv, at(j), None))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        axis = normalize_axis("softmax", self.axis, y.type.rank)
        dot = b.reduce_sum(b.mul(g, y), axes=(axis,), keepdims=True)
        return [b.mul(y, b.sub(g, dot))]


@register("log_softmax", Fusion.REDUCTION)
class LogSoftmax(AxisSoftmax):
    gpu_per_iteration = True
    stores_exp = False

    def reference(self, x):
        shifted = x - x.max(axis=self.axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=self.axis, keepdims=True))

    def normalize(self, k, x, out, n, at, m, s, epilogue):
        lse = m + e.log(s)
        with k.loop(n, LoopKind.VECTOR, "j") as j:
            k.store(out, at(j), epilogue(x.load_flat(at(j)) - lse, at(j), None))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        axis = normalize_axis("log_softmax", self.axis, y.type.rank)
        total = b.reduce_sum(g, axes=(axis,), keepdims=True)
        return [b.sub(g, b.mul(b.exp(y), total))]


@register("layer_norm", Fusion.REDUCTION)
class LayerNorm(Op):
    """Normalize over axes [axis, rank): (x - mean) / sqrt(var + eps) * scale + bias."""

    gpu_per_iteration = True

    arity = (2, 3)
    accepts_epilogue = True
    accepts_prologue = True
    axis: int = -1
    epsilon: float = 1e-5

    def infer(self, x: TensorType, scale: TensorType, bias: TensorType | None = None):
        _float("layer_norm", x)
        axis = normalize_axis("layer_norm", self.axis, x.rank)
        for name, t in (("scale", scale), ("bias", bias)):
            if t is not None and (t.shape != x.shape[axis:] or t.dtype != x.dtype):
                raise GraphError(f"layer_norm: {name} is {t}, expected {x.dtype} of shape {x.shape[axis:]}")
        return x

    def reference(self, x, scale, bias=None):
        axes = tuple(range(normalize_axis("layer_norm", self.axis, x.ndim), x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + x.dtype.type(self.epsilon)) * scale
        return y + bias if bias is not None else y

    def lower(self, k, ins, out, epilogue=None):
        x, scale = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        outer, n, _ = _split(x.shape, normalize_axis("layer_norm", self.axis, len(x.shape)), len(x.shape))
        with k.loop(outer, LoopKind.PARALLEL, "row") as r:
            s = k.local(x.dtype, 0.0, "sum")
            with k.loop(n, LoopKind.VECTOR, "j") as j:
                k.assign(s, s.ref + x.load_flat(r * n + j), reduction=True)
            mean = k.local(x.dtype, s.ref / float(n), "mean")
            v = k.local(x.dtype, 0.0, "var")
            with k.loop(n, LoopKind.VECTOR, "j") as j:
                d = x.load_flat(r * n + j) - mean.ref
                k.assign(v, v.ref + d * d, reduction=True)
            rstd = k.local(x.dtype, 1.0 / e.sqrt(v.ref / float(n) + self.epsilon), "rstd")
            with k.loop(n, LoopKind.VECTOR, "j") as j:
                y = (x.load_flat(r * n + j) - mean.ref) * rstd.ref * scale.load_flat(j)
                y = y + bias.load_flat(j) if bias is not None else y
                k.store(out, r * n + j, epilogue(y, r * n + j, None) if epilogue is not None else y)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """With x̂ = (x - mean)·rstd over axes [axis, rank): dx = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)),
        ĝ = g·scale; dscale = Σ g·x̂ and dbias = Σ g over the leading axes."""
        x, scale = node.inputs[0], node.inputs[1]
        rank = x.type.rank
        axis = normalize_axis("layer_norm", self.axis, rank)
        axes, lead = tuple(range(axis, rank)), tuple(range(axis))
        mean = b.reduce_mean(x, axes=axes, keepdims=True)
        centered = b.sub(x, mean)
        var = b.reduce_mean(b.mul(centered, centered), axes=axes, keepdims=True)
        rstd = b.rsqrt(b.add(var, constant(b, self.epsilon, x)))
        xhat = b.mul(centered, rstd)
        gh = b.mul(g, scale)
        inner = b.sub(
            b.sub(gh, b.reduce_mean(gh, axes=axes, keepdims=True)),
            b.mul(xhat, b.reduce_mean(b.mul(gh, xhat), axes=axes, keepdims=True)),
        )
        grads: Grads = [
            b.mul(rstd, inner),
            b.reduce_sum(b.mul(g, xhat), axes=lead, keepdims=False) if lead else b.mul(g, xhat),
        ]
        if len(node.inputs) > 2:
            grads.append(b.reduce_sum(g, axes=lead, keepdims=False) if lead else g)
        return grads
