"""Kernel IR as text, for `kiln inspect` and for reading what lowering produced."""

from __future__ import annotations

from codegen import kir

_INFIX = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "div": "/",
    "floordiv": "//",
    "rem": "%",
    "and": "&&",
    "or": "||",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "eq": "==",
    "ne": "!=",
}


def expr_text(e: kir.Expr) -> str:
    if isinstance(e, kir.Const):
        return repr(e.value) if e.dtype != "float32" else f"{e.value!r}f"
    if isinstance(e, kir.Var):
        return e.name
    if isinstance(e, kir.LocalRef):
        return e.local.name
    if isinstance(e, kir.Load):
        return f"{e.buf.root.name}[{expr_text(e.index)}]"
    if isinstance(e, (kir.Binary, kir.Compare)):
        if e.op in _INFIX:
            return f"({expr_text(e.a)} {_INFIX[e.op]} {expr_text(e.b)})"
        return f"{e.op}({expr_text(e.a)}, {expr_text(e.b)})"
    if isinstance(e, kir.Unary):
        return f"{e.op}({expr_text(e.a)})"
    if isinstance(e, kir.MulAdd):
        return f"muladd({expr_text(e.a)}, {expr_text(e.b)}, {expr_text(e.c)})"
    if isinstance(e, kir.Select):
        return f"select({expr_text(e.cond)}, {expr_text(e.a)}, {expr_text(e.b)})"
    if isinstance(e, kir.Cast):
        return f"{e.dtype}({expr_text(e.a)})"
    raise TypeError(e)


def _stmts(body: list[kir.Stmt], indent: str, out: list[str]) -> None:
    for s in body:
        if isinstance(s, kir.Loop):
            out.append(f"{indent}for {s.var.name} in {s.kind.value}(0, {expr_text(s.extent)}):")
            _stmts(s.body, indent + "  ", out)
        elif isinstance(s, kir.If):
            out.append(f"{indent}if {expr_text(s.cond)}:")
            _stmts(s.body, indent + "  ", out)
        elif isinstance(s, kir.Store):
            out.append(f"{indent}{s.buf.root.name}[{expr_text(s.index)}] = {expr_text(s.value)}")
        elif isinstance(s, kir.DeclareLocal):
            out.append(f"{indent}{s.local.dtype} {s.local.name} = {expr_text(s.init)}")
        elif isinstance(s, kir.Assign):
            out.append(f"{indent}{s.local.name} = {expr_text(s.value)}")
        elif isinstance(s, kir.Check):
            out.append(f"{indent}check {expr_text(s.ok)} else status = {s.code}")
        elif isinstance(s, kir.Barrier):
            out.append(f"{indent}barrier()")
        elif isinstance(s, kir.Prefetch):
            out.append(f"{indent}prefetch {s.buf.root.name}[{expr_text(s.index)}]")
        elif isinstance(s, kir.Shuffle):
            shuffle = f"shuffle_{s.mode.value}({expr_text(s.value)}, {s.offset})"
            out.append(f"{indent}{s.local.dtype} {s.local.name} = {shuffle}")


def kernel_text(k: kir.Kernel) -> str:
    params = ", ".join(f"{b.dtype}[{','.join(map(str, b.shape))}] {b.name}" for b in k.params)
    out = [f"kernel {k.name}({params}):"]
    out += [f"  shared {b.dtype}[{','.join(map(str, b.shape))}] {b.name}" for b in k.shared]
    _stmts(k.body, "  ", out)
    return "\n".join(out)
