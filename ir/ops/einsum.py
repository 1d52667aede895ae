"""einsum: a sum of products over named axes, the general form of contractions.

The op takes an explicit equation without ellipses ("bij,bjk->bik"); frontends
expand ellipses and implicit outputs with `normalize_equation`. A letter's axes
broadcast: where one operand has size 1 and another n, the letter has size n.
Frontends turn the common two-operand contractions into matmuls (see
`as_matmul`), so this generic loop nest serves the rest (diagonals, traces,
three operands, outer products) without tiling.
"""

from __future__ import annotations

from contextlib import ExitStack
from math import prod
from typing import TYPE_CHECKING

import numpy as np

from codegen.kir import Expr, LoopKind, const
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import Fusion, Grads, Op, register
from ir.ops.grad import unbroadcast
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder


def normalize_equation(equation: str, ranks: list[int]) -> str:
    """An explicit equation with every ellipsis spelled out as letters (ONNX/numpy rules:
    without '->' the output is the ellipsis, then the letters used once, sorted)."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise GraphError(f"einsum: {equation!r} names {len(terms)} operands, got {len(ranks)}")
    used = set(equation) - set(".,->")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used)
    own_ranks = [r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t]
    ellipsis_rank = max(own_ranks, default=0)
    ellipsis = "".join(next(spare) for _ in range(ellipsis_rank))
    expanded = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            own = rank - len(term.replace("...", ""))
            term = term.replace("...", ellipsis[ellipsis_rank - own :])
        if len(term) != rank:
            raise GraphError(f"einsum: term {term!r} of {equation!r} does not fit an operand of rank {rank}")
        expanded.append(term)
    if arrow:
        out = rhs.replace("...", ellipsis)
    else:
        letters = "".join(expanded)
        once = [c for c in set(letters) if letters.count(c) == 1 and c not in ellipsis]
        out = ellipsis + "".join(sorted(once))
    return ",".join(expanded) + "->" + out


def parse(equation: str) -> tuple[list[str], str]:
    lhs, _, out = equation.partition("->")
    return lhs.split(","), out


def letter_sizes(equation: str, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    terms, out = parse(equation)
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        if len(term) != len(shape):
            raise GraphError(f"einsum: term {term!r} of {equation!r} does not fit shape {shape}")
        for c, d in zip(term, shape):
            if sizes.get(c, 1) not in (1, d) and d != 1:
                raise GraphError(f"einsum: letter {c!r} has sizes {sizes[c]} and {d} in {equation!r}")
            sizes[c] = max(sizes.get(c, 1), d) if d != 0 else 0
    missing = set(out) - set(sizes)
    if missing:
        raise GraphError(f"einsum: output letters {sorted(missing)} of {equation!r} name no input axis")
    return sizes


@register("einsum", Fusion.CONTRACTION)
class Einsum(Op):
    gpu_per_iteration = True
    arity = (1, 8)
    equation: str = ""

    def infer(self, *xs: TensorType) -> TensorType:
        if len({x.dtype for x in xs}) != 1:
            raise GraphError(f"einsum: operand dtypes differ: {[x.dtype for x in xs]}")
        terms, out = parse(self.equation)
        if len(terms) != len(xs) or "." in self.equation:
            raise GraphError(f"einsum: {self.equation!r} must be explicit and name {len(xs)} operands")
        sizes = letter_sizes(self.equation, [x.shape for x in xs])
        return TensorType(xs[0].dtype, tuple(sizes[c] for c in out))

    def reference(self, *xs):
        return np.einsum(self.equation, *xs).astype(xs[0].dtype)

    def lower(self, k, ins, out, epilogue=None):
        terms, out_letters = parse(self.equation)
        sizes = letter_sizes(self.equation, [b.shape for b in ins])
        summed = [c for c in dict.fromkeys("".join(terms)) if c not in out_letters]
        target = out if out.shape else out.view((1,))
        with k.nest(target.shape) as idx:
            at: dict[str, Expr] = dict(zip(out_letters, idx))
            acc = k.local(out.dtype, 0, "sum")
            with ExitStack() as loops:
                for n, c in enumerate(summed):
                    kind = LoopKind.VECTOR if n == len(summed) - 1 else LoopKind.SERIAL
                    at[c] = loops.enter_context(k.loop(sizes[c], kind, c.lower()))
                product: Expr | None = None
                for term, buf in zip(terms, ins):
                    # an axis of size 1 broadcasts: it is read at 0 whatever the letter's index
                    value = buf[[at[c] if d != 1 else const(0, "int64") for c, d in zip(term, buf.shape)]]
                    product = value if product is None else product * value
                k.assign(acc, acc.ref + product, reduction=True)
            k.store(target, idx, acc.ref)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """Each operand's gradient is the einsum of g with the other operands onto its own
        letters; letters only that operand has (summed away alone) broadcast back, and
        letters it holds at size 1 (broadcast) are summed."""
        from ir.ops.einsum import letter_sizes, parse

        terms, out = parse(self.equation)
        sizes = letter_sizes(self.equation, [v.type.shape for v in node.inputs])
        grads: Grads = []
        for i, (term, x) in enumerate(zip(terms, node.inputs)):
            if len(set(term)) != len(term):
                raise GraphError(
                    f"node {node.name}: no einsum gradient for a repeated letter (diagonal) in {term!r}"
                )
            others = [(t, v) for j, (t, v) in enumerate(zip(terms, node.inputs)) if j != i]
            reachable = set(out).union(*(t for t, _ in others))
            kept = "".join(c for c in term if c in reachable)
            gx = b.einsum(
                g, *(v for _, v in others), equation=",".join([out, *(t for t, _ in others)]) + "->" + kept
            )
            if kept != term:
                gx = b.reshape(
                    gx, shape=tuple(gx.type.shape[kept.index(c)] if c in kept else 1 for c in term)
                )
            gx = b.expand(gx, shape=tuple(sizes[c] for c in term))
            grads.append(unbroadcast(b, gx, x.type.shape))
        return grads


def as_matmul(equation: str, shapes: list[tuple[int, ...]]) -> dict | None:
    """How a two-operand einsum is a batched matmul, or None. The plan names, per
    operand, the permutation to (batch, free, contracted) order, and the output's
    permutation from (batch, free_a, free_b). Letters on one side only and absent from
    the output (summed away alone), repeats within a term, and broadcasting are left
    to the generic op."""
    terms, out = parse(equation)
    if len(terms) != 2:
        return None
    a, b = terms
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    sizes = letter_sizes(equation, shapes)
    for term, shape in zip(terms, shapes):
        if any(d != sizes[c] for c, d in zip(term, shape)):
            return None
    if any(c not in out and not (c in a and c in b) for c in a + b):
        return None
    batch = [c for c in out if c in a and c in b]
    free_a = [c for c in out if c in a and c not in b]
    free_b = [c for c in out if c in b and c not in a]
    contracted = [c for c in a if c in b and c not in out]
    order = batch + free_a + free_b

    def size(letters: list[str]) -> int:
        return prod(sizes[c] for c in letters)

    return {
        "perm_a": tuple(a.index(c) for c in batch + free_a + contracted),
        "perm_b": tuple(b.index(c) for c in batch + contracted + free_b),
        "shape_a": (size(batch), size(free_a), size(contracted)),
        "shape_b": (size(batch), size(contracted), size(free_b)),
        "unflat": tuple(sizes[c] for c in order),
        "perm_out": tuple(order.index(c) for c in out),
    }
