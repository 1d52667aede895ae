"""The kernel IR: small, target-neutral loop nests over flat buffers.

A Kernel is a list of statements over Buffers (its parameters, in order). Loops
carry a kind that tells a backend how to run them: `serial`, `parallel` (split
across threads on the CPU), `vector` (the innermost, contiguous loop: the CPU
backend leaves it in the shape LLVM's vectorizer wants), `vector_masked` (the same,
with its tail run as masked vector operations rather than a scalar loop: for short
runs such as a matrix tile's last columns), `tile` (a register tile's row, a whole
number of vectors of a constant extent: vectorized at that full extent, which the
backend splits into registers side by side, so each operation of the body runs on the
whole row before the next one starts), `team` (a kernel's top loop whose iterations,
its members, run at once, one CPU thread each where there are threads enough, and
wait for each other at a Barrier in the body: a team of members that share one
sequence of steps, such as a recurrence's units split over cores), `gpu_block` and
`gpu_thread` (bound to CUDA's block and thread indices; the CPU runs them as
plain loops, which is how GPU kernels are tested on machines with no GPU).

Expressions are immutable trees with a dtype. Index arithmetic is int64. Python
numbers mix in freely: `i * 4 + 1` builds Binary nodes, folding constants so the
printed IR stays readable.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from math import prod


class LoopKind(enum.Enum):
    """How a backend runs a loop (see the module docstring)."""

    SERIAL = "serial"
    PARALLEL = "parallel"
    VECTOR = "vector"
    VECTOR_MASKED = "vector_masked"
    TILE = "tile"
    TEAM = "team"
    GPU_BLOCK = "gpu_block"
    GPU_THREAD = "gpu_thread"

    @property
    def vector(self) -> bool:
        return self in (LoopKind.VECTOR, LoopKind.VECTOR_MASKED, LoopKind.TILE)


#: bytes of a cache line: what a Prefetch fetches
CACHE_LINE = 64
ITEMSIZE = {"float32": 4, "float64": 8, "int64": 8, "int32": 4, "bool": 1}
FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int64", "int32")


class Expr:
    dtype: str

    def _bin(self, op: str, other: object, swap: bool = False) -> Expr:
        o = lift(other, self.dtype)
        return binary(op, o, self) if swap else binary(op, self, o)

    def __add__(self, o: object) -> Expr:
        return self._bin("add", o)

    def __radd__(self, o: object) -> Expr:
        return self._bin("add", o, True)

    def __sub__(self, o: object) -> Expr:
        return self._bin("sub", o)

    def __rsub__(self, o: object) -> Expr:
        return self._bin("sub", o, True)

    def __mul__(self, o: object) -> Expr:
        return self._bin("mul", o)

    def __rmul__(self, o: object) -> Expr:
        return self._bin("mul", o, True)

    def __truediv__(self, o: object) -> Expr:
        return self._bin("div", o)

    def __rtruediv__(self, o: object) -> Expr:
        return self._bin("div", o, True)

    def __floordiv__(self, o: object) -> Expr:
        return self._bin("floordiv", o)

    def __mod__(self, o: object) -> Expr:
        return self._bin("rem", o)

    def __neg__(self) -> Expr:
        return unary("neg", self)

    def lt(self, o: object) -> Expr:
        return compare("lt", self, lift(o, self.dtype))

    def le(self, o: object) -> Expr:
        return compare("le", self, lift(o, self.dtype))

    def gt(self, o: object) -> Expr:
        return compare("gt", self, lift(o, self.dtype))

    def ge(self, o: object) -> Expr:
        return compare("ge", self, lift(o, self.dtype))

    def eq(self, o: object) -> Expr:
        return compare("eq", self, lift(o, self.dtype))

    def ne(self, o: object) -> Expr:
        return compare("ne", self, lift(o, self.dtype))


@dataclass(frozen=True, eq=False)
class Const(Expr):
    value: float | int | bool
    dtype: str


@dataclass(frozen=True, eq=False)
class Var(Expr):
    name: str
    dtype: str = "int64"


@dataclass(frozen=True, eq=False)
class Load(Expr):
    buf: Buffer
    index: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.buf.dtype


@dataclass(frozen=True, eq=False)
class Binary(Expr):
    op: str  # add sub mul div min max pow rem floordiv and or
    a: Expr
    b: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.a.dtype


@dataclass(frozen=True, eq=False)
class Unary(Expr):
    op: str  # neg abs exp log sqrt tanh erf sigmoid floor ceil not
    a: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.a.dtype


@dataclass(frozen=True, eq=False)
class MulAdd(Expr):
    """a * b + c, which a backend may compute with one rounding (an FMA). Only where
    that is welcome: contractions' accumulations, not code that relies on x - x == 0."""

    a: Expr
    b: Expr
    c: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.a.dtype


@dataclass(frozen=True, eq=False)
class Compare(Expr):
    op: str  # lt le gt ge eq ne
    a: Expr
    b: Expr
    dtype: str = "bool"


@dataclass(frozen=True, eq=False)
class Select(Expr):
    cond: Expr
    a: Expr
    b: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.a.dtype


@dataclass(frozen=True, eq=False)
class Cast(Expr):
    a: Expr
    dtype: str


@dataclass(frozen=True, eq=False)
class LocalRef(Expr):
    local: Local

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.local.dtype


BINARY_OPS = ("add", "sub", "mul", "div", "min", "max", "pow", "rem", "trem", "floordiv", "and", "or")
UNARY_OPS = (
    "neg", "abs", "exp", "log", "sqrt", "tanh", "erf", "sigmoid", "floor", "ceil", "roundeven", "not",
)  # fmt: skip
COMPARE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")


def lift(x: object, dtype: str) -> Expr:
    """A Python number becomes a Const of the other operand's dtype."""
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool):
        return Const(x, "bool")
    if isinstance(x, (int, float)):
        return Const(float(x) if dtype in FLOAT_DTYPES else int(x), dtype)
    raise TypeError(f"cannot use {x!r} in a kernel expression")


def const(value: float | int | bool, dtype: str) -> Const:
    return Const(value, dtype)


def _is(e: Expr, v: float) -> bool:
    return isinstance(e, Const) and e.value == v


def binary(op: str, a: Expr, b: Expr) -> Expr:
    assert op in BINARY_OPS, op
    if a.dtype != b.dtype:
        raise TypeError(f"kernel IR {op}: operand dtypes differ ({a.dtype} vs {b.dtype})")
    # Fold integer index arithmetic only: float folds could change rounding.
    if a.dtype in INT_DTYPES:
        if isinstance(a, Const) and isinstance(b, Const) and op in ("add", "sub", "mul"):
            va, vb = int(a.value), int(b.value)
            return Const({"add": va + vb, "sub": va - vb, "mul": va * vb}[op], a.dtype)
        if (
            isinstance(a, Const)
            and isinstance(b, Const)
            and op in ("floordiv", "rem")
            and a.value >= 0 < b.value
        ):
            va, vb = int(a.value), int(b.value)  # non-negative: C's truncation is Python's floor
            return Const(va // vb if op == "floordiv" else va % vb, a.dtype)
        if op == "add" and _is(a, 0):
            return b
        if op in ("add", "sub") and _is(b, 0):
            return a
        if op == "mul" and (_is(a, 0) or _is(b, 0)):
            return Const(0, a.dtype)
        if op == "mul" and _is(a, 1):
            return b
        if op in ("mul", "floordiv") and _is(b, 1):
            return a
        if op == "rem" and _is(b, 1):
            return Const(0, a.dtype)
    return Binary(op, a, b)


def unary(op: str, a: Expr) -> Expr:
    assert op in UNARY_OPS, op
    return Unary(op, a)


def compare(op: str, a: Expr, b: Expr) -> Expr:
    assert op in COMPARE_OPS, op
    if a.dtype != b.dtype:
        raise TypeError(f"kernel IR compare {op}: operand dtypes differ ({a.dtype} vs {b.dtype})")
    return Compare(op, a, b)


def muladd(a: Expr, b: Expr, c: Expr) -> Expr:
    if not a.dtype == b.dtype == c.dtype:
        raise TypeError(f"kernel IR muladd: dtypes differ ({a.dtype}, {b.dtype}, {c.dtype})")
    return MulAdd(a, b, c)


def select(cond: Expr, a: object, b: object) -> Expr:
    dtype = a.dtype if isinstance(a, Expr) else b.dtype  # type: ignore[union-attr]
    return Select(cond, lift(a, dtype), lift(b, dtype))


def cast(a: Expr, dtype: str) -> Expr:
    return a if a.dtype == dtype else Cast(a, dtype)


def minimum(a: Expr, b: object) -> Expr:
    return binary("min", a, lift(b, a.dtype))


def maximum(a: Expr, b: object) -> Expr:
    return binary("max", a, lift(b, a.dtype))


def logical_and(a: Expr, b: Expr) -> Expr:
    return binary("and", a, b)


def logical_or(a: Expr, b: Expr) -> Expr:
    return binary("or", a, b)


def _unary_fn(op: str) -> staticmethod:
    return staticmethod(lambda x: unary(op, x))


class ExprBuilder:
    """What an op's `scalar` rule gets to build one element's computation with."""

    const = staticmethod(const)
    select = staticmethod(select)
    cast = staticmethod(cast)
    minimum = staticmethod(minimum)
    maximum = staticmethod(maximum)
    logical_and = staticmethod(logical_and)
    logical_or = staticmethod(logical_or)

    @staticmethod
    def logical_xor(a: Expr, b: Expr) -> Expr:
        return a.ne(b)

    exp = _unary_fn("exp")
    log = _unary_fn("log")
    sqrt = _unary_fn("sqrt")
    tanh = _unary_fn("tanh")
    erf = _unary_fn("erf")
    sigmoid = _unary_fn("sigmoid")
    abs = _unary_fn("abs")
    floor = _unary_fn("floor")
    ceil = _unary_fn("ceil")
    roundeven = _unary_fn("roundeven")
    logical_not = _unary_fn("not")

    @staticmethod
    def pow(x: Expr, y: Expr) -> Expr:
        return binary("pow", x, y)

    @staticmethod
    def trunc_rem(x: Expr, y: Expr) -> Expr:
        """C's % on integers (sign of x); `%` on Exprs is Python's (sign of y)."""
        return binary("trem", x, y)


# --------------------------------------------------------------------------- buffers


@dataclass(eq=False)
class Buffer:
    """A kernel parameter: a dense row-major array of `dtype` with `shape`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: the buffer this one reshapes (same memory, same kernel parameter)
    base: Buffer | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def root(self) -> Buffer:
        return self.base.root if self.base is not None else self

    def view(self, shape: tuple[int, ...]) -> Buffer:
        """The same elements seen with another shape (row-major, no copy)."""
        if prod(shape) != self.numel:
            raise ValueError(f"buffer {self.name}: cannot view {self.shape} as {shape}")
        return Buffer(self.name, self.dtype, tuple(shape), self)

    def offset(self, idx: Sequence[Expr | int]) -> Expr:
        """The flat element offset of a multi-index (row-major)."""
        if len(idx) != len(self.shape):
            raise ValueError(f"buffer {self.name}: rank {len(self.shape)} indexed with {len(idx)}")
        flat: Expr = Const(0, "int64")
        stride = 1
        for i, d in zip(reversed(idx), reversed(self.shape)):
            flat = lift(i, "int64") * stride + flat
            stride *= d
        return flat

    def __getitem__(self, idx: Sequence[Expr | int] | Expr | int) -> Expr:
        if not isinstance(idx, (tuple, list)):
            idx = (idx,)
        return Load(self, self.offset(idx))

    def load_flat(self, index: Expr) -> Expr:
        return Load(self, index)


# --------------------------------------------------------------------------- statements


@dataclass(eq=False)
class Local:
    """A scalar variable private to one iteration of the enclosing loops."""

    name: str
    dtype: str

    @property
    def ref(self) -> Expr:
        return LocalRef(self)


@dataclass(eq=False)
class Loop:
    var: Var
    extent: Expr
    kind: LoopKind
    body: list[Stmt] = field(default_factory=list)
    #: GPU loops: the grid or block axis the loop is bound to (0, 1, 2: x, y, z)
    axis: int = 0


@dataclass(eq=False)
class Store:
    buf: Buffer
    index: Expr
    value: Expr


@dataclass(eq=False)
class DeclareLocal:
    local: Local
    init: Expr


@dataclass(eq=False)
class Assign:
    local: Local
    value: Expr
    #: a reduction update: the backend may reassociate it (vectorize the sum).
    reduction: bool = False


@dataclass(eq=False)
class If:
    cond: Expr
    body: list[Stmt] = field(default_factory=list)


@dataclass(eq=False)
class Check:
    """`ok` must hold. Where it does not, the kernel sets its status buffer to `code`
    (and goes on, so that the runtime can name the failure instead of crashing)."""

    ok: Expr
    status: Buffer
    code: int


#: int64 words of a CPU team's barrier state (see KernelBuilder.team): the arrivals of
#: the current round and the rounds completed, each on its own cache line
TEAM_STATE_WORDS = 16

#: threads of a warp, which run in lockstep and exchange registers with Shuffle
WARP = 32


class ShuffleMode(enum.Enum):
    XOR = "xor"  # the lane whose index is this lane's ^ offset (a butterfly)
    DOWN = "down"  # the lane offset above this one; lanes past the warp's end keep their own


@dataclass(eq=False)
class Barrier:
    """Every thread of the block (every member of a CPU team) reaches this point before
    any goes past it, and sees the stores the others made before it (CUDA's
    __syncthreads)."""


@dataclass(eq=False)
class Shuffle:
    """Declare `local` as `value` as another lane of the warp holds it (see ShuffleMode).
    Every lane of the warp executes it together, like a barrier of the warp."""

    local: Local
    value: Expr
    mode: ShuffleMode
    offset: int


@dataclass(eq=False)
class Prefetch:
    """A hint that buf[index] will be read soon: its cache line is fetched now, so that
    the fetch overlaps the arithmetic before the read. No effect on any value."""

    buf: Buffer
    index: Expr


Stmt = Loop | Store | DeclareLocal | Assign | If | Check | Barrier | Shuffle | Prefetch


def _extent_bound(e: Expr) -> int | None:
    """A loop extent's value, or for a clamped one like min(n - i, block) its constant
    bound; None where neither is known at compile time."""
    if isinstance(e, Const):
        return int(e.value)
    if isinstance(e, Binary) and e.op == "min":
        bounds = [b for b in (_extent_bound(e.a), _extent_bound(e.b)) if b is not None]
        return min(bounds) if bounds else None
    return None


def _per_run(body: list[Stmt], cost: Callable[[Stmt], int]) -> int:
    """The sum of cost over the statements the body executes, loops multiplied out."""
    total = 0
    for s in body:
        if isinstance(s, Loop):
            bound = _extent_bound(s.extent)
            total += max(1 if bound is None else bound, 0) * _per_run(s.body, cost)
        elif isinstance(s, If):
            total += _per_run(s.body, cost)
        else:
            total += cost(s)
    return total


def estimate_work(body: list[Stmt]) -> int:
    """Statements the body executes: what a kernel costs, roughly."""
    return _per_run(body, lambda s: 1)


def _expr_flops(e: Expr) -> int:
    """Floating-point operations in one evaluation of e (a muladd counts two)."""
    if isinstance(e, (Const, Var, LocalRef, Load)):
        return 0
    own = 0
    if e.dtype in FLOAT_DTYPES or isinstance(e, Compare) and e.a.dtype in FLOAT_DTYPES:
        own = 2 if isinstance(e, MulAdd) else 0 if isinstance(e, (Select, Cast)) else 1
    children = [getattr(e, f) for f in ("a", "b", "c", "cond") if isinstance(getattr(e, f, None), Expr)]
    return own + sum(_expr_flops(c) for c in children)


def estimate_flops(body: list[Stmt]) -> int:
    """Floating-point operations the body executes."""

    def cost(s: Stmt) -> int:
        value = {Store: "value", Assign: "value", DeclareLocal: "init"}.get(type(s))
        return _expr_flops(getattr(s, value)) if value else 0

    return _per_run(body, cost)


@dataclass(eq=False)
class Kernel:
    name: str
    params: list[Buffer]
    body: list[Stmt]
    #: the messages of its Checks (status code i + 1 → checks[i]); the status buffer,
    #: an int32[1], is then the last param
    checks: list[str] = field(default_factory=list)
    #: small buffers private to each thread running the kernel (not parameters)
    scratch: list[Buffer] = field(default_factory=list)
    #: GPU kernels: buffers shared by the threads of a block (shared memory)
    shared: list[Buffer] = field(default_factory=list)
    #: bytes its schedule must read again beyond each buffer once (a recurrence reads
    #: its weights at every step, since each step needs the state the last one made)
    reread_bytes: int = 0
    #: its parallel steps each stream their own part of a large buffer that calls read
    #: again (a batch-1 product's column parts of its weights): the runtime runs them
    #: last to first on every other call, so that a call first reads what the call
    #: before it read last, which is still in cache
    alternate_steps: bool = False

    @property
    def work(self) -> int:
        return estimate_work(self.body)

    @property
    def flops(self) -> int:
        return estimate_flops(self.body)

    @property
    def bytes(self) -> int:
        """The fewest bytes the kernel must move: each buffer read or written once, and
        what it must read again."""
        return sum(b.numel * ITEMSIZE[b.dtype] for b in self.params) + self.reread_bytes

    @property
    def parallel_loop(self) -> Loop | None:
        """The single top-level parallel loop the runtime splits across threads."""
        return self._top_loop(LoopKind.PARALLEL)

    @property
    def team_loop(self) -> Loop | None:
        """The single top-level team loop (see LoopKind), whose members the runtime
        splits across threads as it splits a parallel loop's iterations."""
        return self._top_loop(LoopKind.TEAM)

    @property
    def split_loop(self) -> Loop | None:
        """The top-level loop the runtime hands out in slices: parallel or team."""
        return self.parallel_loop or self.team_loop

    def _top_loop(self, kind: LoopKind) -> Loop | None:
        if len(self.body) == 1 and isinstance(self.body[0], Loop):
            loop = self.body[0]
            if loop.kind is kind and isinstance(loop.extent, Const):
                return loop
        return None


def code_key(kernel: Kernel) -> str:
    """What a kernel's machine code depends on: its parameters' dtypes and shapes in
    order, its scratch and shared buffers and its body, every buffer, loop variable and
    local numbered by its first appearance instead of named. Kernels of one key compile
    to the same code (a transformer's layers: 56 kernels, 14 keys), so a library emits
    that code once; their check messages, which the C glue holds, may differ."""
    numbers: dict[int, int] = {}

    def canonical(x: object) -> object:
        if isinstance(x, (Buffer, Var, Local)):
            if id(x) in numbers:
                return numbers[id(x)]
            numbers[id(x)] = len(numbers)
            named = [canonical(getattr(x, f.name)) for f in fields(x) if f.name != "name"]
            return (type(x).__name__, numbers[id(x)], *named)
        if isinstance(x, enum.Enum):
            return x.name
        if isinstance(x, (list, tuple)):
            return tuple(canonical(v) for v in x)
        if is_dataclass(x):
            return (type(x).__name__, *(canonical(getattr(x, f.name)) for f in fields(x)))
        return repr(x)

    parts = (kernel.params, kernel.scratch, kernel.shared, kernel.body)
    return hashlib.sha256(repr(canonical(parts)).encode()).hexdigest()


@dataclass(frozen=True)
class VectorUnit:
    """The vector registers a CPU schedule sizes its register tiles for: float32 lanes
    per register and how many registers there are. A tile of sums that needs more
    registers than there are spills to the stack, and each step of its loop then
    stores and reloads them."""

    lanes: int
    registers: int


AVX512 = VectorUnit(16, 32)
AVX2 = VectorUnit(8, 16)


class KernelBuilder:
    """Builds a Kernel with nested `with` blocks, in the order the code reads.
    `flat_block`, `unit` and `threads` are what the schedules size themselves by: the
    elements of a flat loop's parallel step, the target's vector registers, and the
    threads the library runs with by default (a team's members)."""

    def __init__(
        self,
        name: str,
        params: list[Buffer],
        flat_block: int = 4096,
        unit: VectorUnit = AVX512,
        threads: int = 1,
    ):
        self.name = name
        self.params = params
        self.flat_block = flat_block
        self.unit = unit
        self.threads = threads
        self.status: Buffer | None = None
        self.team_state: Buffer | None = None
        self.checks: list[str] = []
        self._stack: list[list[Stmt]] = [[]]
        self._loops: list[Loop] = []  # the loops open around the statement being built
        self._scratch: list[Buffer] = []
        self._shared: list[Buffer] = []
        self._ids = itertools.count()
        self.reread_bytes = 0  # see Kernel.reread_bytes
        self.alternate_steps = False  # see Kernel.alternate_steps

    def _emit(self, stmt: Stmt) -> None:
        self._stack[-1].append(stmt)

    @contextmanager
    def loop(
        self, extent: Expr | int, kind: LoopKind = LoopKind.SERIAL, name: str = "i", axis: int = 0
    ) -> Iterator[Var]:
        var = Var(f"{name}{next(self._ids)}")
        loop = Loop(var, lift(extent, "int64"), LoopKind(kind), axis=axis)
        self._emit(loop)
        self._stack.append(loop.body)
        self._loops.append(loop)
        try:
            yield var
        finally:
            self._stack.pop()
            self._loops.pop()

    @contextmanager
    def when(self, cond: Expr) -> Iterator[None]:
        """Statements that run only where `cond` holds (a branch: keep it out of hot loops)."""
        stmt = If(cond)
        self._emit(stmt)
        self._stack.append(stmt.body)
        try:
            yield
        finally:
            self._stack.pop()

    @contextmanager
    def flat(self, n: int) -> Iterator[Expr]:
        """One loop over n contiguous elements: parallel blocks of `flat_block`, each a
        vector loop (with flat_block 1, as a GPU wants: one element per iteration)."""
        block = max(1, min(self.flat_block, n))
        blocks = -(-n // block)
        with self.loop(blocks, LoopKind.PARALLEL, "blk") as b:
            extent = block if n % block == 0 else minimum(Const(n, "int64") - b * block, block)
            with self.loop(extent, LoopKind.VECTOR, "e") as i:
                yield b * block + i

    @contextmanager
    def nest(self, shape: Sequence[int]) -> Iterator[list[Expr]]:
        """Every multi-index of `shape`: rows of the last axis in parallel, the last axis
        as a vector loop. A rank-1 shape is split into parallel blocks."""
        if len(shape) == 0:
            yield []
        elif len(shape) == 1:
            with self.flat(shape[0]) as i:
                yield [i]
        else:
            with self.loop(prod(shape[:-1]), LoopKind.PARALLEL, "r") as r:
                with self.loop(shape[-1], LoopKind.VECTOR, "j") as j:
                    yield unravel(r, shape[:-1]) + [j]

    def check(self, ok: Expr, message: str) -> None:
        """Report `message` from the run if `ok` fails at any point (see Check). The
        loops around a check run serially: its conditional store does not vectorize."""
        for loop in self._loops:
            if loop.kind.vector:
                loop.kind = LoopKind.SERIAL
        if self.status is None:
            self.status = Buffer("status", "int32", (1,))
        self.checks.append(message)
        self._emit(Check(ok, self.status, len(self.checks)))

    def local(self, dtype: str, init: object, name: str = "acc") -> Local:
        loc = Local(f"{name}{next(self._ids)}", dtype)
        self._emit(DeclareLocal(loc, lift(init, dtype)))
        return loc

    def assign(self, local: Local, value: Expr, reduction: bool = False) -> None:
        self._emit(Assign(local, value, reduction))

    def store(self, buf: Buffer, idx: Sequence[Expr | int] | Expr, value: Expr) -> None:
        index = buf.offset(idx) if isinstance(idx, (tuple, list)) else idx
        if value.dtype != buf.dtype:
            raise TypeError(f"store to {buf.name} ({buf.dtype}) of a {value.dtype} value")
        self._emit(Store(buf, index, value))

    def prefetch(self, buf: Buffer, index: Expr | int) -> None:
        """Fetch buf[index]'s cache line ahead of its reads (see Prefetch)."""
        self._emit(Prefetch(buf, lift(index, "int64")))

    def scratch(self, name: str, dtype: str, shape: tuple[int, ...]) -> Buffer:
        """A small buffer private to each thread (on its stack): partial results a loop
        nest keeps between its loops, which LLVM may hold in registers."""
        buf = Buffer(f"{name}{next(self._ids)}", dtype, tuple(shape))
        self._scratch.append(buf)
        return buf

    def shared(self, name: str, dtype: str, shape: tuple[int, ...]) -> Buffer:
        """A buffer shared by the threads of a GPU block (shared memory)."""
        buf = Buffer(f"{name}{next(self._ids)}", dtype, tuple(shape))
        self._shared.append(buf)
        return buf

    @contextmanager
    def team(self, members: int) -> Iterator[Var]:
        """The kernel's body as a team of `members` (see LoopKind.TEAM), yielding the
        member's index; k.barrier() inside waits for every member. On the CPU the
        barrier's state is the last parameter, `team` (the runtime's, per instance)."""
        if self._stack != [[]]:
            raise ValueError(f"kernel {self.name}: a team is the whole kernel body")
        self.team_state = Buffer("team", "int64", (TEAM_STATE_WORDS,))
        with self.loop(members, LoopKind.TEAM, "member") as m:
            yield m

    def barrier(self) -> None:
        self._emit(Barrier())

    def shuffle(self, value: Expr, mode: ShuffleMode, offset: int, name: str = "lane") -> Expr:
        """value as the lane `offset` away (see ShuffleMode) holds it."""
        loc = Local(f"{name}{next(self._ids)}", value.dtype)
        self._emit(Shuffle(loc, value, mode, offset))
        return loc.ref

    def splice(self, kernel: Kernel) -> None:
        """Emit another kernel's body here, with its scratch and shared buffers and its
        checks (renumbered after this kernel's, reporting to this kernel's status)."""
        base = len(self.checks)
        if kernel.checks:
            if self.status is None:
                self.status = Buffer("status", "int32", (1,))
            self.checks.extend(kernel.checks)

        def renumber(s: Stmt) -> list[Stmt] | None:
            return [Check(s.ok, self.status, s.code + base)] if isinstance(s, Check) else None  # type: ignore[arg-type]

        for stmt in rewrite_stmts(kernel.body, lambda e: None, renumber):
            self._emit(stmt)
        self._scratch.extend(kernel.scratch)
        self._shared.extend(kernel.shared)
        self.reread_bytes += kernel.reread_bytes
        self.alternate_steps |= kernel.alternate_steps

    def finish(self) -> Kernel:
        assert len(self._stack) == 1, "unclosed block"
        extra = [self.status, self.team_state]
        params = self.params + [b for b in extra if b is not None]
        return Kernel(
            self.name,
            params,
            self._stack[0],
            self.checks,
            self._scratch,
            self._shared,
            self.reread_bytes,
            self.alternate_steps,
        )


def unravel(flat: Expr, shape: Sequence[int]) -> list[Expr]:
    """The row-major multi-index of a flat index into `shape` (the outermost axis needs
    no modulo: the flat index is in range)."""
    idx: list[Expr] = []
    inner = 1
    for d in reversed(shape):
        idx.insert(0, flat // inner % d if inner * d != prod(shape) else flat // inner)
        inner *= d
    return idx


def reshape_index(idx: Sequence[Expr | int], shape: Sequence[int], to: Sequence[int]) -> list[Expr | int]:
    """The multi-index into `to` of the element at `idx` of `shape`, both row-major
    views of the same elements (a reshape), dividing as little as the axes allow.

    The index is taken as digits, innermost first, each with its extent, and each axis
    of `to`, innermost first, is made of the next digits: a digit of its extent as it
    is; the remainder of a digit whose extent is a multiple of the axis (the quotient
    stays a digit); a digit whose extent divides the axis as the axis's low part. A
    flat offset unravelled again would divide a vector loop's index at every level."""
    digits: list[tuple[Expr | int, int]] = [(i, d) for i, d in zip(reversed(idx), reversed(shape)) if d != 1]

    def take(n: int) -> Expr | int:
        value, extent = digits.pop(0)
        if extent == n:
            return value
        if extent % n == 0:
            digits.insert(0, (value // n, extent // n))
            return value % n
        if n % extent == 0:
            return value + take(n // extent) * extent
        higher, size = digits.pop(0)  # no digit boundary falls in this axis: join two
        digits.insert(0, (value + higher * extent, extent * size))
        return take(n)

    return [0 if n == 1 else take(n) for n in reversed(to)][::-1]


def guarded_load(buf: Buffer, idx: Sequence[Expr | int], inside: Expr, other: object) -> Expr:
    """buf[idx] where `inside` holds, else `other`, never touching memory outside buf.

    The address is clamped to element 0 when `inside` is false, so the load is
    always legal and the whole thing stays branch-free (vectorizable). An operand that
    is not a buffer (a value computed where it is read) is read at index 0 instead.
    """
    if not isinstance(buf, Buffer):
        safe_idx = [select(inside, lift(i, "int64"), Const(0, "int64")) for i in idx]
        return select(inside, buf[safe_idx], lift(other, buf.dtype))
    flat = buf.offset(idx)
    if isinstance(inside, Const) and inside.value:
        return Load(buf, flat)
    safe = Select(inside, flat, Const(0, "int64"))
    return select(inside, Load(buf, safe), lift(other, buf.dtype))


def in_range(i: Expr, lo: int, hi: int) -> Expr:
    """lo <= i < hi as a bool expression."""
    return logical_and(i.ge(lo), i.lt(hi))


def rewrite(e: Expr, fn: Callable[[Expr], Expr | None]) -> Expr:
    """e rebuilt bottom-up: each node's children first, then fn(node) replaces the node
    where it returns an expression (None keeps it)."""
    if isinstance(e, (Const, Var, LocalRef)):
        node = e
    elif isinstance(e, Load):
        node = Load(e.buf, rewrite(e.index, fn))
    elif isinstance(e, (Binary, Compare)):
        node = type(e)(e.op, rewrite(e.a, fn), rewrite(e.b, fn))
    elif isinstance(e, Unary):
        node = Unary(e.op, rewrite(e.a, fn))
    elif isinstance(e, Select):
        node = Select(rewrite(e.cond, fn), rewrite(e.a, fn), rewrite(e.b, fn))
    elif isinstance(e, MulAdd):
        node = MulAdd(rewrite(e.a, fn), rewrite(e.b, fn), rewrite(e.c, fn))
    elif isinstance(e, Cast):
        node = Cast(rewrite(e.a, fn), e.dtype)
    else:
        raise TypeError(f"unknown expression {e!r}")
    replaced = fn(node)
    return node if replaced is None else replaced


def rewrite_stmts(
    body: list[Stmt],
    fn: Callable[[Expr], Expr | None],
    stmt_fn: Callable[[Stmt], list[Stmt] | None] | None = None,
) -> list[Stmt]:
    """body with every expression rewritten by fn (see rewrite); stmt_fn may replace a
    statement, after its own expressions and body are rewritten, by a list of them."""
    out: list[Stmt] = []
    for s in body:
        r: Stmt
        if isinstance(s, Loop):
            r = Loop(s.var, rewrite(s.extent, fn), s.kind, rewrite_stmts(s.body, fn, stmt_fn), s.axis)
        elif isinstance(s, Store):
            r = Store(s.buf, rewrite(s.index, fn), rewrite(s.value, fn))
        elif isinstance(s, DeclareLocal):
            r = DeclareLocal(s.local, rewrite(s.init, fn))
        elif isinstance(s, Assign):
            r = Assign(s.local, rewrite(s.value, fn), s.reduction)
        elif isinstance(s, If):
            r = If(rewrite(s.cond, fn), rewrite_stmts(s.body, fn, stmt_fn))
        elif isinstance(s, Check):
            r = Check(rewrite(s.ok, fn), s.status, s.code)
        elif isinstance(s, Shuffle):
            r = Shuffle(s.local, rewrite(s.value, fn), s.mode, s.offset)
        elif isinstance(s, Prefetch):
            r = Prefetch(s.buf, rewrite(s.index, fn))
        else:
            r = s
        replaced = stmt_fn(r) if stmt_fn is not None else None
        out.extend([r] if replaced is None else replaced)
    return out


def substitute(e: Expr, env: dict[Var, Expr]) -> Expr:
    """e with every Var in env replaced by its expression."""
    return rewrite(e, lambda x: env.get(x) if isinstance(x, Var) else None)


def substitute_stmts(body: list[Stmt], env: dict[Var, Expr]) -> list[Stmt]:
    return rewrite_stmts(body, lambda x: env.get(x) if isinstance(x, Var) else None)
