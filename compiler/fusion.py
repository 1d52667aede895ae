"""Fusion: partition a graph's nodes into groups, each lowered to one kernel.

Rules, by each op's fusion class:
- elementwise ops with the same output shape chain into one group; a node joins the
  group of each of its producers it can, so diamonds (x → a, x → b, a + b) fuse whole;
- elementwise ops after a contraction (matmul, linear, conv2d) or a reduction (reduce_*,
  softmax, log_softmax, layer_norm) become its epilogue, applied as it stores;
- an elementwise group whose only result feeds a reduction becomes its prologue,
  computed as the reduction reads (recomputed on each of its passes: cheaper than a
  round trip through memory);
- row groups: reductions over the last axis that keep it (shape (..., 1)) and the
  elementwise ops around them over the rows (..., n) or the per-row results (..., 1)
  become one kernel that takes each row through as many passes as it has reductions:
  this is what makes a softmax or a layer norm written out of primitive ops (x - max,
  exp, sum, divide; mean, variance, rsqrt) one kernel;
- reshape and flatten are views: no kernel, the memory plan gives them their input's bytes;
- index chains: an op that only moves elements (transpose, slice, gather, pad, ...)
  takes in the views and such ops whose only reader it is, so a chain of them (an
  attention head's reshape, gather, transpose, reshape, transpose) is one kernel that
  reads each element where the chain began and stores it where the chain ends.

Correctness. A group is a set of nodes that becomes one kernel running at one point
of the schedule, so two groups may merge only if no path leaves one and comes back
through a third (that third group would have to run both before and after): checked
with each value's set of ancestor nodes. Values a group computes that something
outside it reads are stored (a kernel may have several outputs), so nothing is
computed twice, except a prologue (by rule). A contraction's or a reduction's raw
result must have no reader but the epilogue, which overwrites it in place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ir.graph import Graph, Node, Value
from ir.ops import Fusion
from ir.ops.shape import PerElement


class GroupKind(enum.Enum):
    """What kind of kernel a group becomes."""

    ELEMENTWISE = "elementwise"  # one loop nest computing every member at each point
    ANCHORED = "anchored"  # a contraction's or reduction's loops, with a prologue and epilogue
    ROWS = "rows"  # last-axis reductions and the elementwise ops around them, row by row
    SINGLE = "single"  # one op's own loops
    INDEXED = "indexed"  # an op that moves elements, reading through the index ops before it
    VIEW = "view"  # no kernel: the output is the input's bytes (a reshape)


@dataclass(eq=False)
class Group:
    nodes: list[Node]
    kind: GroupKind
    anchor: Node | None = None
    prologue: list[Node] = field(default_factory=list)
    #: an elementwise group's index chains: members read through, never stored
    moves: list[Node] = field(default_factory=list)
    bits: int = 0  # the nodes, as bits of their graph positions
    row_shape: tuple[int, ...] = ()  # rows groups: (..., n)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the group's loops run over."""
        if self.kind is GroupKind.ROWS:
            return self.row_shape
        if self.kind is GroupKind.INDEXED:
            return self.tail.type.shape
        node = self.anchor or next(n for n in self.nodes if n not in self.moves)
        return node.outputs[0].type.shape

    def fits_rows(self, shape: tuple[int, ...]) -> bool:
        """A rows group holds values over its rows or one per row."""
        return shape in (self.row_shape, self.row_shape[:-1] + (1,))

    @property
    def tail(self) -> Value:
        return self.nodes[-1].outputs[0]

    def produced(self) -> set[Value]:
        return {n.outputs[0] for n in self.nodes}


class _Partitioner:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.users = graph.consumers()
        self.outputs = set(graph.outputs)
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self.ancestors: dict[Value, int] = {v: 0 for v in [*graph.inputs, *graph.params]}
        for i, n in enumerate(graph.nodes):
            bits = 1 << i
            for v in n.inputs:
                bits |= self.ancestors[v]
            self.ancestors[n.outputs[0]] = bits
        self.group_of: dict[Node, Group] = {}

    def new_group(self, node: Node, kind: GroupKind) -> Group:
        anchor = node if kind is GroupKind.ANCHORED else None
        g = Group([node], kind, anchor, bits=1 << self.position[node])
        self.group_of[node] = g
        return g

    def external_inputs(self, g: Group) -> list[Value]:
        inside = g.produced()
        return [v for n in g.nodes for v in n.inputs if v not in inside]

    def independent(self, a: Group, b: Group) -> bool:
        """No path from a to b through another group, nor from b to a: they may merge.
        A path between nodes is one between their groups; but a group that already
        holds unrelated nodes (x → p and y → q merged) also joins paths its nodes do
        not, so the groups' own paths are followed too."""
        inside = a.produced() | b.produced()
        for src, dst in ((a, b), (b, a)):
            for v in self.external_inputs(dst):
                if v not in inside and self.ancestors[v] & src.bits:
                    return False
        return not self._reaches_through_others(a, b) and not self._reaches_through_others(b, a)

    def _reaches_through_others(self, src: Group, dst: Group) -> bool:
        """Whether dst reads, through at least one other group, from src."""
        stack = [g for g in self._sources_of(dst) if g is not src and g is not dst]
        seen: set[int] = set()
        while stack:
            g = stack.pop()
            if id(g) in seen:
                continue
            seen.add(id(g))
            for p in self._sources_of(g):
                if p is src:
                    return True
                if p is not dst and id(p) not in seen:
                    stack.append(p)
        return False

    def _sources_of(self, g: Group) -> list[Group]:
        """The groups g reads values from (other than itself)."""
        groups = (self._group_producing(v) for v in self.external_inputs(g))
        return list({id(p): p for p in groups if p is not None and p is not g}.values())

    def merge(self, into: Group, other: Group) -> None:
        order = sorted(into.nodes + other.nodes, key=self.position.__getitem__)
        into.nodes[:] = order
        into.bits |= other.bits
        for n in other.nodes:
            self.group_of[n] = into

    def sole_reader(self, v: Value, node: Node) -> bool:
        return v not in self.outputs and all(u is node for u in self.users[v])

    def try_elementwise(self, node: Node) -> None:
        """Merge node's group into each producer group it may join (see the module doc)."""
        own = self.group_of[node]
        for v in node.inputs:
            g = self._group_producing(v)
            if g is None or g is own or not self.independent(g, own):
                continue
            if g.kind is GroupKind.ELEMENTWISE is own.kind and g.shape == own.shape:
                self.merge(g, own)
                own = g
            elif g.kind is GroupKind.ANCHORED and self._epilogue_fits(g, own, node, v):
                self.merge(g, own)
                own = g
            elif g.kind is GroupKind.ROWS and self._rows_fit(g, own):
                self.merge(g, own)
                own = g
            elif own.kind is GroupKind.ROWS and g.kind is GroupKind.ELEMENTWISE and self._rows_fit(own, g):
                self.merge(own, g)

    def _epilogue_fits(self, g: Group, own: Group, node: Node, v: Value) -> bool:
        return (
            own.nodes == [node]
            and v is g.tail
            and g.anchor.op.accepts_epilogue
            and node.outputs[0].type.shape == g.shape
            # the anchor accumulates in the final buffer: the epilogue may not change its dtype
            and node.outputs[0].type.dtype == g.tail.type.dtype
            and self.sole_reader(v, node)
        )

    def _rows_fit(self, rows: Group, other: Group) -> bool:
        if other.kind is GroupKind.ROWS:
            return other.row_shape == rows.row_shape
        return other.kind is GroupKind.ELEMENTWISE and all(
            rows.fits_rows(n.outputs[0].type.shape) for n in other.nodes
        )

    def try_rows(self, node: Node) -> None:
        """node is a last-axis reduction: join the rows group or elementwise group of its input."""
        own = self.group_of[node]
        g = self._group_producing(node.inputs[0])
        if g is not None and g is not own and self._rows_fit(own, g) and self.independent(g, own):
            if g.kind is GroupKind.ROWS:
                self.merge(g, own)
            else:
                self.merge(own, g)

    def try_indexed(self, node: Node) -> None:
        """node only moves elements: take in the views and index groups whose result
        only it reads, and, through a view taken in, what that view reads."""
        own = self.group_of[node]
        if not reads_through(node):
            return
        pending = [node]
        while pending:
            member = pending.pop()
            for v in member.inputs:
                g = self._move_read_only_by(v, [member], own)
                if g is None or not self.independent(g, own):
                    continue
                self.merge(own, g)
                if g.kind is GroupKind.VIEW:
                    pending.append(g.nodes[0])

    def _move_read_only_by(self, v: Value, readers: list[Node], own: Group) -> Group | None:
        """The view or indexed group (other than own) whose result is v, when only
        `readers` read v and it is no graph output."""
        g = self._group_producing(v)
        if (
            g is None
            or g is own
            or g.kind not in (GroupKind.VIEW, GroupKind.INDEXED)
            or g.tail is not v
            or v in self.outputs
            or any(u not in readers for u in self.users[v])
        ):
            return None
        return g

    def _group_producing(self, v: Value) -> Group | None:
        node = self._producers.get(v)
        return self.group_of.get(node) if node is not None else None

    def try_prologue(self, node: Node) -> None:
        """node is an anchor that accepts a prologue on input 0: absorb its producer group."""
        x = node.inputs[0]
        g = self._group_producing(x)
        own = self.group_of[node]
        if (
            g is None
            or g.kind is not GroupKind.ELEMENTWISE
            or g.tail is not x
            or not self.sole_reader(x, node)
        ):
            return
        inside = g.produced()
        if any(u not in g.nodes for v in inside - {x} for u in self.users[v]) or inside & self.outputs:
            return  # another reader needs one of its values: it must stay a kernel
        if not self.independent(g, own):
            return
        own.prologue = list(g.nodes)
        self.merge(own, g)

    def run(self, fuse: bool) -> list[Group]:
        self._producers = self.graph.producers()
        groups: list[Group] = []
        for node in self.graph.nodes:
            out = node.outputs[0]
            if node.op.view and out not in self.outputs:
                groups.append(self.new_group(node, GroupKind.VIEW))
                continue
            fusion = node.op.fusion
            if not fuse:
                groups.append(self.new_group(node, GroupKind.SINGLE))
            elif fusion == Fusion.ELEMENTWISE:
                groups.append(self.new_group(node, GroupKind.ELEMENTWISE))
                self.try_elementwise(node)
            elif is_row_reduction(node):
                g = self.new_group(node, GroupKind.ROWS)
                g.row_shape = node.inputs[0].type.shape
                groups.append(g)
                self.try_rows(node)
            elif node.op.accepts_epilogue or node.op.accepts_prologue:
                groups.append(self.new_group(node, GroupKind.ANCHORED))
                if node.op.accepts_prologue:
                    self.try_prologue(node)
            elif moves_elements(node):
                groups.append(self.new_group(node, GroupKind.INDEXED))
                self.try_indexed(node)
            else:
                groups.append(self.new_group(node, GroupKind.SINGLE))
        if fuse:
            self.epilogue_groups()
            self.elementwise_read_through()
        unique = list(dict.fromkeys(self.group_of[n] for n in self.graph.nodes))
        return _schedule(unique, self.graph)

    def epilogue_groups(self) -> None:
        """An elementwise group that alone reads an anchor's result becomes its epilogue,
        even when it reads it twice (GELU: x * (1 + erf(x / sqrt 2)) / 2), provided it
        hands on one value only, its last."""
        for g in list(dict.fromkeys(self.group_of[n] for n in self.graph.nodes)):
            if g.kind is not GroupKind.ANCHORED or not g.anchor.op.accepts_epilogue or g.tail in self.outputs:
                continue
            readers = {self.group_of[u] for u in self.users[g.tail]}
            if len(readers) != 1:
                continue
            (e,) = readers
            if (
                e.kind is GroupKind.ELEMENTWISE
                and e.shape == g.shape
                and stored_values(e, self.users, self.outputs) == [e.tail]
                and e.tail.type.dtype == g.tail.type.dtype  # stored where the anchor sums
                and self.independent(g, e)
            ):
                self.merge(g, e)

    def elementwise_read_through(self) -> None:
        """An elementwise group takes in the index chains (indexed groups, and the views
        after them) whose result only it reads, at its own shape or through views of it
        (each element computed once): a scale applied to an attention head's Q as it
        is picked out of the projection. A view of a stored value stays a view (read
        flat). Done last, so no such group joins an anchored or rows group, whose
        lowerings do not read through chains."""
        for own in list(dict.fromkeys(self.group_of[n] for n in self.graph.nodes)):
            if own.kind is not GroupKind.ELEMENTWISE:
                continue
            for v in self.external_inputs(own):
                chain = self._chain_to(own, v) if v.type.shape == own.shape else []
                for g in chain:  # nearest first: each then reads own directly
                    if not self.independent(g, own):
                        break
                    own.moves += g.nodes
                    self.merge(own, g)

    def _chain_to(self, own: Group, v: Value) -> list[Group]:
        """The groups of an index chain ending in v, through views, that only `own`
        reads and may join it; none unless the chain reaches an indexed group."""
        chain: list[Group] = []
        readers = own.nodes
        while True:
            g = self._move_read_only_by(v, readers, own)
            if g is None:
                return []
            chain.append(g)
            if g.kind is GroupKind.INDEXED:
                return chain
            readers, v = g.nodes, g.nodes[0].inputs[0]


def stored_values(group: Group, users: dict[Value, list[Node]], outputs: set[Value]) -> list[Value]:
    """The values a group computes that something outside it reads: its kernel stores them."""
    return [
        n.outputs[0]
        for n in group.nodes
        if n.outputs[0] in outputs or any(u not in group.nodes for u in users[n.outputs[0]])
    ]


def moves_elements(node: Node) -> bool:
    """Each output element is one input element at an index computed from its own
    (`PerElement.element`), or the node is a view: it can be read through."""
    op = node.op
    return op.view or (op.fusion == Fusion.INJECTIVE and isinstance(op, PerElement))


def reads_through(node: Node) -> bool:
    """node moves elements and takes in the element-moving nodes before it: unless it
    is a transpose that moves the innermost axis, which reads across rows; read
    through a chain, its stride is the chain's source's, often a multiple of 4 KiB
    (K of an attention head transposed from a projection 768 wide: every read of a
    row in one L1 set), so it reads a stored, compact input instead."""
    if not moves_elements(node):
        return False
    if node.op.name != "transpose":
        return True
    rank = node.inputs[0].type.rank
    return rank == 0 or node.op.axes(rank)[-1] == rank - 1


def is_row_reduction(node: Node) -> bool:
    """A float reduction over the last axis that keeps it: the seed of a rows group."""
    x = node.inputs[0].type
    return (
        node.op.row_reduction
        and x.rank >= 1
        and x.shape[-1] > 1  # else a row and its one result have the same shape
        and x.dtype.startswith("float")
        and node.op.keepdims
        and node.op._axes(x.rank) == (x.rank - 1,)
    )


def _schedule(groups: list[Group], graph: Graph) -> list[Group]:
    """Groups in an order where each runs after the groups it reads from."""
    producer = {n.outputs[0]: g for g in groups for n in g.nodes}
    done: set[int] = set()
    order: list[Group] = []
    pending = list(groups)
    while pending:
        for g in pending:
            inside = g.produced()
            deps = {id(producer[v]) for n in g.nodes for v in n.inputs if v in producer and v not in inside}
            if deps <= done:
                order.append(g)
                done.add(id(g))
                pending.remove(g)
                break
        else:
            raise AssertionError("fusion produced a cycle between groups")
    return order


def partition(graph: Graph, fuse: bool = True) -> list[Group]:
    """The graph's nodes as groups in schedule order (fuse=False: one node per group)."""
    return _Partitioner(graph).run(fuse)
