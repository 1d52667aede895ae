"""Kernel IR → LLVM IR, shared by the CPU and NVPTX backends.

`FunctionWriter` turns statements and expressions into instructions in one LLVM
function. Loop variables and locals live in allocas that LLVM promotes to
registers; loops are emitted in the canonical form its vectorizer expects (a
counted loop with a unit step). A backend decides the function's signature and
how the loop kinds it treats specially (parallel, GPU-bound) are entered.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from llvmlite import ir

from codegen import kir
from codegen.mathlib import math_function

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
#: how each dtype looks in a register; bool is i1 there and i8 in memory (as numpy stores it)
REG_TYPES: dict[str, ir.Type] = {
    "float32": ir.FloatType(),
    "float64": ir.DoubleType(),
    "int64": I64,
    "int32": I32,
    "bool": I1,
}
MEM_TYPES = {**REG_TYPES, "bool": I8}

_FCMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "=="}
_ICMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_LIBM64 = {"exp": "exp", "log": "log", "tanh": "tanh", "erf": "erf"}

LoopHook = Callable[["FunctionWriter", kir.Loop], bool]
#: a backend's own statements (a GPU's barriers and shuffles): True where it emitted s
StmtHook = Callable[["FunctionWriter", kir.Stmt], bool]

LOOP_TAG = "kiln.loop."
_LOOP_TAG_LINE = re.compile(r'^(!\d+) = !\{\s*!"kiln\.loop\.(\w+)\.[^"]*"\s*\}$', re.MULTILINE)


def loop_metadata(llvm_ir: str) -> str:
    """Turn each loop's kind tag into LLVM loop metadata, so LLVM's vectorizer works on
    the loops the kernel IR marks `vector` and leaves the others alone (left to itself it
    may vectorize an outer loop with gathers once it has unrolled a short inner one).
    `vector` loops are left to the vectorizer's cost model rather than forced: forcing
    made LLVM print "loop not vectorized" warnings to the user's terminal wherever it
    declined (strided float reductions, 33-element loops), and measured no faster.
    `vector_masked` loops also ask for their tail to be folded into masked vector
    operations (a matmul tile's last columns: 1.2-1.5x on odd widths); asked of every
    loop, it slowed the row kernels' reductions by 15%. `tile` loops are vectorized at
    their whole extent (their tag carries it): the row of a register tile becomes one
    wide vector that codegen splits into registers side by side, so a product's
    broadcast meets all of the row's vectors at once and dies. Left to the cost model
    (8 lanes, interleaved twice on AVX2), the first half of every row was computed
    before the second, and the rows' broadcasts, live across the halves, spilled.

    llvmlite cannot write the self-referencing `distinct` node a loop ID must be, so
    the tags are rewritten in the module's text."""
    extra = len(re.findall(r"^!\d+ = ", llvm_ir, re.MULTILINE)) + 1000
    vector, masked = kir.LoopKind.VECTOR.value, kir.LoopKind.VECTOR_MASKED.value
    nodes = {
        vector: (f"!{extra}", '!{!"llvm.loop.mustprogress"}'),
        masked: (f"!{extra + 1}", '!{!"llvm.loop.vectorize.predicate.enable", i1 true}'),
    }
    off = (f"!{extra + 2}", '!{!"llvm.loop.vectorize.enable", i1 false}')  # loops that must not vectorize

    def rewrite(m: re.Match) -> str:
        kind = m[2]
        if kind.startswith(kir.LoopKind.TILE.value) and kind not in nodes:
            width = int(kind[len(kir.LoopKind.TILE.value) :])
            nodes[kind] = (f"!{extra + 3 + len(nodes)}", f'!{{!"llvm.loop.vectorize.width", i32 {width}}}')
        return f"{m[1]} = distinct !{{{m[1]}, {nodes.get(kind, off)[0]}}}"

    text = _LOOP_TAG_LINE.sub(rewrite, llvm_ir)
    return text + "\n" + "".join(f"{node} = {value}\n" for node, value in [*nodes.values(), off])


def _tag_kind(kind: kir.LoopKind, stop: ir.Value) -> str:
    """A loop's kind as its tag names it: a tile loop's with its extent (its vector width)."""
    if kind is not kir.LoopKind.TILE:
        return kind.value
    if not isinstance(stop, ir.Constant):
        raise ValueError("a tile loop needs a constant extent")
    return f"{kind.value}{stop.constant}"


class FunctionWriter:
    def __init__(
        self,
        fn: ir.Function,
        pointers: dict[kir.Buffer, ir.Value],
        loop_hook: LoopHook | None = None,
        scratch: list[kir.Buffer] | None = None,
        stmt_hook: StmtHook | None = None,
        libm: bool = True,
    ):
        """libm=False: float64 exp/log/tanh/erf and pow of every dtype become inline code
        (codegen.mathlib) instead of libm calls, for a target that has no libm (a GPU)."""
        self.fn = fn
        self.libm = libm
        self.module: ir.Module = fn.module
        # allocas go in their own entry block, which branches to `start` once done
        self.entry = fn.append_basic_block("entry")
        self.start = fn.append_basic_block("start")
        self.b = ir.IRBuilder(self.start)
        self._allocas = ir.IRBuilder(self.entry)
        self.pointers = dict(pointers)
        for buf in scratch or []:
            size = ir.Constant(I64, buf.numel)
            self.pointers[buf] = self._allocas.alloca(MEM_TYPES[buf.dtype], size=size, name=buf.name)
        self.slots: dict[object, ir.Value] = {}  # Var / Local -> alloca
        self.loop_hook = loop_hook
        self.stmt_hook = stmt_hook
        self._cache: dict[int, ir.Value] = {}

    # ------------------------------------------------------------------ helpers
    def slot(self, key: object, typ: ir.Type, name: str) -> ir.Value:
        if key not in self.slots:
            self.slots[key] = self._allocas.alloca(typ, name=name)
        return self.slots[key]

    def finish(self) -> None:
        """Close the function: the current block returns, the alloca block falls into start."""
        self.b.ret_void()
        self._allocas.branch(self.start)

    def address(self, buf: kir.Buffer, index: kir.Expr) -> ir.Value:
        return self.b.gep(
            self.pointers[buf.root], [self.expr(index)], inbounds=True, source_etype=MEM_TYPES[buf.dtype]
        )

    # ------------------------------------------------------------------ statements
    def stmts(self, body: list[kir.Stmt]) -> None:
        for s in body:
            self._cache = {}
            if isinstance(s, kir.Loop):
                if not (self.loop_hook and self.loop_hook(self, s)):
                    self.counted_loop(s.var, ir.Constant(I64, 0), self.expr(s.extent), s.body, s.kind)
            elif isinstance(s, kir.Store):
                value = self.expr(s.value)
                if s.buf.dtype == "bool":
                    value = self.b.zext(value, I8)
                self.b.store(value, self.address(s.buf, s.index))
            elif isinstance(s, kir.DeclareLocal):
                init = self.expr(s.init)
                self.b.store(init, self.slot(s.local, REG_TYPES[s.local.dtype], s.local.name))
            elif isinstance(s, kir.Assign):
                value = self.expr(s.value, reassoc=s.reduction)
                self.b.store(value, self.slots[s.local])
            elif isinstance(s, kir.If):
                with self.b.if_then(self.expr(s.cond)):
                    self.stmts(s.body)
            elif isinstance(s, kir.Check):
                failed = self.b.xor(self.expr(s.ok), ir.Constant(I1, 1))
                with self.b.if_then(failed, likely=False):
                    ptr = self.pointers[s.status.root]
                    self.b.atomic_rmw("xchg", ptr, ir.Constant(I32, s.code), "monotonic")
            elif isinstance(s, kir.Prefetch):
                self._prefetch(self.address(s.buf, s.index))
            elif not (self.stmt_hook and self.stmt_hook(self, s)):
                raise TypeError(f"this backend has no {type(s).__name__} statement")

    def _prefetch(self, address: ir.Value) -> None:
        """llvm.prefetch(address, read, locality 3: into every cache level, data)."""
        name = "llvm.prefetch.p0"
        fn = self.module.globals.get(name) or ir.Function(
            self.module, ir.FunctionType(ir.VoidType(), [PTR, I32, I32, I32]), name
        )
        self.b.call(fn, [address, *(ir.Constant(I32, v) for v in (0, 3, 1))])

    def counted_loop(
        self, var: kir.Var, start: ir.Value, stop: ir.Value, body: list[kir.Stmt], kind: kir.LoopKind
    ) -> None:
        """for (var = start; var < stop; ++var) body, tagged with its kind (see loop_metadata)"""
        slot = self.slot(var, I64, var.name)
        self.b.store(start, slot)
        head = self.fn.append_basic_block(f"{var.name}.head")
        loop = self.fn.append_basic_block(f"{var.name}.body")
        done = self.fn.append_basic_block(f"{var.name}.done")
        self.b.branch(head)
        self.b.position_at_end(head)
        self.b.cbranch(self.b.icmp_signed("<", self.b.load(slot, typ=I64), stop), loop, done)
        self.b.position_at_end(loop)
        self.stmts(body)
        self.b.store(self.b.add(self.b.load(slot, typ=I64), ir.Constant(I64, 1), flags=["nsw"]), slot)
        back_edge = self.b.branch(head)
        tag = ir.MetaDataString(self.module, f"{LOOP_TAG}{_tag_kind(kind, stop)}.{self.fn.name}.{var.name}")
        back_edge.set_metadata("llvm.loop", self.module.add_metadata([tag]))
        self.b.position_at_end(done)

    def bind(self, var: kir.Var, value: ir.Value) -> None:
        """Give a loop variable a fixed value (a GPU index), instead of looping."""
        self.b.store(value, self.slot(var, I64, var.name))

    def declare(self, local: kir.Local, value: ir.Value) -> None:
        """Give a local its value (a statement of a backend's own, such as a shuffle)."""
        self.b.store(value, self.slot(local, REG_TYPES[local.dtype], local.name))

    # ------------------------------------------------------------------ expressions
    def expr(self, e: kir.Expr, reassoc: bool = False) -> ir.Value:
        key = id(e)
        if key not in self._cache:
            self._cache[key] = self._expr(e, reassoc)
        return self._cache[key]

    def _expr(self, e: kir.Expr, reassoc: bool) -> ir.Value:
        b = self.b
        if isinstance(e, kir.Const):
            typ = REG_TYPES[e.dtype]
            return ir.Constant(typ, float(e.value) if e.dtype in kir.FLOAT_DTYPES else int(e.value))
        if isinstance(e, kir.Var):
            return b.load(self.slots[e], typ=I64)
        if isinstance(e, kir.LocalRef):
            return b.load(self.slots[e.local], typ=REG_TYPES[e.dtype])
        if isinstance(e, kir.Load):
            value = b.load(self.address(e.buf, e.index), typ=MEM_TYPES[e.buf.dtype])
            return b.trunc(value, I1) if e.buf.dtype == "bool" else value
        if isinstance(e, kir.Binary):
            return self._binary(e.op, self.expr(e.a), self.expr(e.b), e.a.dtype, reassoc)
        if isinstance(e, kir.Unary):
            return self._unary(e.op, self.expr(e.a), e.a.dtype)
        if isinstance(e, kir.Compare):
            a, c = self.expr(e.a), self.expr(e.b)
            if e.a.dtype in kir.FLOAT_DTYPES:
                return b.fcmp_unordered("!=", a, c) if e.op == "ne" else b.fcmp_ordered(_FCMP[e.op], a, c)
            return b.icmp_signed(_ICMP[e.op], a, c)
        if isinstance(e, kir.Select):
            return b.select(self.expr(e.cond), self.expr(e.a), self.expr(e.b))
        if isinstance(e, kir.MulAdd):
            x, y, z = self.expr(e.a), self.expr(e.b), self.expr(e.c)
            if e.dtype in kir.FLOAT_DTYPES:
                return self._call_intrinsic("llvm.fmuladd", x, y, z)
            return b.add(b.mul(x, y), z)
        if isinstance(e, kir.Cast):
            return self._cast(self.expr(e.a), e.a.dtype, e.dtype)
        raise TypeError(f"unknown expression {e!r}")

    def _call_intrinsic(self, name: str, *args: ir.Value) -> ir.Value:
        typ = args[0].type
        fnty = ir.FunctionType(typ, [typ] * len(args))
        return self.b.call(self.module.declare_intrinsic(name, [typ], fnty), list(args))

    def _binary(self, op: str, a: ir.Value, c: ir.Value, dtype: str, reassoc: bool) -> ir.Value:
        b = self.b
        if dtype in kir.FLOAT_DTYPES:
            flags = ("reassoc", "nsz") if reassoc else ()
            simple = {"add": b.fadd, "sub": b.fsub, "mul": b.fmul, "div": b.fdiv, "rem": b.frem}
            if op in simple:
                return simple[op](a, c, flags=flags)
            if op in ("min", "max"):  # numpy semantics: NaN wins
                if reassoc:  # a reduction's update: LLVM vectorizes llvm.maximum's, not selects'
                    return self._call_intrinsic(f"llvm.{op}imum", a, c)
                return self._nan_wins(op, a, c)
            if op == "pow":
                if not self.libm:
                    return b.call(math_function(self.module, "pow", dtype), [a, c])
                name = "powf" if dtype == "float32" else "pow"
                return b.call(self._libm(name, a.type, 2), [a, c])
        elif dtype == "bool":
            if op in ("and", "or"):
                return b.and_(a, c) if op == "and" else b.or_(a, c)
        else:
            simple = {"add": b.add, "sub": b.sub, "mul": b.mul}
            if op in simple:
                return simple[op](a, c)
            if op in ("min", "max"):
                return b.select(b.icmp_signed("<" if op == "min" else ">", a, c), a, c)
            if op in ("floordiv", "rem"):
                return self._floor_divmod(op, a, c)
            if op == "div":
                return self._truncating_div(a, c)
            if op == "trem":  # callers keep c away from 0 and MIN % -1 (see ops' guards)
                return b.srem(a, c)
            if op == "pow":  # through double: exact while the result fits 53 bits
                return self._integer_pow(a, c)
        raise TypeError(f"kernel IR: no {op} for {dtype}")

    def _nan_wins(self, op: str, a: ir.Value, c: ir.Value) -> ir.Value:
        """min or max as numpy computes them: a NaN in either operand is the result (the
        signs of equal zeros are not ordered). c > a ? c : a is one vmaxps on x86, which
        returns a where either is NaN, so only c's NaN needs a select, and none where c is
        a constant (a ReLU's 0). llvm.maximum orders -0 below +0 too, which cost x86 five
        instructions a maximum (a max pool and every ReLU epilogue); a reduction keeps it,
        as LLVM vectorizes its reductions (a softmax's row maximum) and not the selects'."""
        b = self.b
        chosen = b.select(b.fcmp_ordered(">" if op == "max" else "<", c, a), c, a)
        return b.select(b.fcmp_unordered("uno", c, c), c, chosen)

    def _integer_pow(self, a: ir.Value, c: ir.Value) -> ir.Value:
        """libm's pow is exact where the result is; the inline one is within a few ulp of
        it, so its result is rounded to the nearest integer first (a negative power's
        fraction, below 1 in magnitude, still truncates to the same integer)."""
        b, f64 = self.b, ir.DoubleType()
        x, y = b.sitofp(a, f64), b.sitofp(c, f64)
        if self.libm:
            return b.fptosi(b.call(self._libm("pow", f64, 2), [x, y]), a.type)
        r = b.call(math_function(self.module, "pow", "float64"), [x, y])
        return b.fptosi(self._call_intrinsic("llvm.rint", r), a.type)

    def _truncating_div(self, a: ir.Value, c: ir.Value) -> ir.Value:
        """C's / (toward zero), as ONNX defines integer Div, without the two cases that
        trap on x86: x / 0 gives 0 and MIN / -1 wraps to MIN."""
        b = self.b
        zero, one, minus_one = (ir.Constant(a.type, v) for v in (0, 1, -1))
        by_zero = b.icmp_signed("==", c, zero)
        by_minus_one = b.icmp_signed("==", c, minus_one)
        safe = b.select(b.or_(by_zero, by_minus_one), one, c)
        q = b.select(by_minus_one, b.sub(zero, a), b.sdiv(a, safe))
        return b.select(by_zero, zero, q)

    def _floor_divmod(self, op: str, a: ir.Value, c: ir.Value) -> ir.Value:
        """Python's // and % (rounding toward -inf), from LLVM's truncating sdiv/srem."""
        b = self.b
        q, r = b.sdiv(a, c), b.srem(a, c)
        zero = ir.Constant(a.type, 0)
        fix = b.and_(
            b.icmp_signed("!=", r, zero),
            b.icmp_signed("!=", b.icmp_signed("<", r, zero), b.icmp_signed("<", c, zero)),
        )
        if op == "floordiv":
            return b.select(fix, b.sub(q, ir.Constant(a.type, 1)), q)
        return b.select(fix, b.add(r, c), r)

    def _unary(self, op: str, a: ir.Value, dtype: str) -> ir.Value:
        b = self.b
        if dtype == "bool":
            if op == "not":
                return b.xor(a, ir.Constant(I1, 1))
        elif dtype in kir.FLOAT_DTYPES:
            if op == "neg":
                return b.fneg(a)
            if op in ("abs", "sqrt", "floor", "ceil", "roundeven"):
                return self._call_intrinsic(f"llvm.{'fabs' if op == 'abs' else op}", a)
            if op in _LIBM64 or op == "sigmoid":
                if dtype == "float32" or not self.libm:
                    return b.call(math_function(self.module, op, dtype), [a])
                if op == "sigmoid":  # libm has none: 1 / (1 + exp(-a))
                    e = b.call(self._libm("exp", a.type, 1), [b.fneg(a)])
                    return b.fdiv(ir.Constant(a.type, 1.0), b.fadd(ir.Constant(a.type, 1.0), e))
                return b.call(self._libm(_LIBM64[op], a.type, 1), [a])
        else:
            if op == "neg":
                return b.neg(a)
            if op == "abs":
                return b.select(b.icmp_signed("<", a, ir.Constant(a.type, 0)), b.neg(a), a)
        raise TypeError(f"kernel IR: no {op} for {dtype}")

    def _libm(self, name: str, typ: ir.Type, arity: int) -> ir.Function:
        if name in self.module.globals:
            return self.module.globals[name]
        return ir.Function(self.module, ir.FunctionType(typ, [typ] * arity), name)

    def _cast(self, a: ir.Value, src: str, dst: str) -> ir.Value:
        b, to = self.b, REG_TYPES[dst]
        fs, fd = src in kir.FLOAT_DTYPES, dst in kir.FLOAT_DTYPES
        if fs and fd:
            return b.fpext(a, to) if to.intrinsic_name == "f64" else b.fptrunc(a, to)
        if fs:
            return b.fptosi(a, to)
        if fd:
            return b.sitofp(a, to)
        if a.type.width < to.width:
            return b.sext(a, to)
        return b.trunc(a, to)
