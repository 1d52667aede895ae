"""The ONNX backend conformance suite run through Kiln.

    python -m frontends.conformance            # every node and real-model case
    python -m frontends.conformance -k relu    # cases whose name contains "relu"

Each case is compiled with `compile_model` and run on the suite's own inputs (inputs
that Kiln needs at compile time, like a Reshape's shape, are fixed to the suite's
values with constant_inputs=, and compiled again if a data set changes them); with
--plain, as a plain backend runs them (compile_model(model), then run(inputs), with
nothing bound or fixed: the model specializes on each call's shapes and values). The
outputs must match the suite's in shape, dtype and value (at the case's rtol/atol).
Cases run in worker processes: a crash or hang ends only that case (the worker is
replaced). A case of an op Kiln does not import is reported unsupported, with the
reason; a case of an op it claims that fails is a failure. The report closes with a
per-op table and one line: 'N passed, N failed'.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CASE_TIMEOUT_SECONDS = 120


@dataclass
class Outcome:
    name: str
    op: str
    status: str  # passed | failed | unsupported
    reason: str = ""


def _cases() -> dict:
    import warnings

    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node") + load_model_tests(kind="real")
    return {c.name: c for c in cases}


@functools.cache
def _op_names() -> list[str]:
    import onnx

    return sorted({s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")})


def _op_of(case, op_names: list[str]) -> str:
    """The op a case tests: the longest ONNX op name its name starts with (the suite
    names cases test_<op>_<variant>; an _expanded case is its op's function body)."""
    if case.model is None:
        return "(model) " + case.model_name
    key = case.name.removeprefix("test_").replace("_", "").lower()
    matching = [op for op in op_names if key.startswith(op.lower())]
    if matching:
        return max(matching, key=len)
    return case.model.graph.node[0].op_type if case.model.graph.node else "?"


def _light_model(case):
    """A 'real' case: the bundled light model, the suite's dummy inputs, its stored outputs."""
    import onnx
    import onnx.backend.test as suite
    from onnx import numpy_helper

    path = Path(suite.__file__).parent.parent.parent.parent / case.url
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        inputs.append((np.arange(n).reshape(shape) / n).astype(np.float32))
    prefix = str(path)[: -len(".onnx")]
    outputs = []
    for i in range(len(model.graph.output)):
        t = onnx.TensorProto()
        t.ParseFromString(Path(f"{prefix}_output_{i}.pb").read_bytes())
        outputs.append(numpy_helper.to_array(t))
    return model, [(inputs, outputs)]


def _is_tensor(x) -> bool:
    return hasattr(x, "dims") or isinstance(x, (np.ndarray, np.generic))


def _normalize(x):
    from onnx import numpy_helper

    return numpy_helper.to_array(x) if hasattr(x, "dims") else np.asarray(x)


def _compile(model, names: list[str], inputs: list):
    """Compile `model` for these inputs: the suite's unknown dimensions are bound to the
    inputs' shapes (as a user binds them with --input-shape), and inputs that Kiln needs
    at compile time (a Reshape's shape fed as an input) are fixed to their values, as a
    user fixes them with constant_inputs=. Returns the model and the fixed names."""
    from compiler.driver import compile_model
    from frontends.onnx import ConstantInputNeeded

    values = {n: _normalize(x) for n, x in zip(names, inputs) if _is_tensor(x)}
    shapes = {n: v.shape for n, v in values.items()}
    fixed: dict[str, np.ndarray] = {}
    while True:
        try:
            bound = {n: s for n, s in shapes.items() if n not in fixed}
            return compile_model(model, name="case", input_shapes=bound, constant_inputs=fixed), fixed
        except ConstantInputNeeded as e:
            if e.input_name in fixed:
                raise
            fixed[e.input_name] = values[e.input_name]


def run_case(case, plain: bool = False) -> Outcome:
    """One case. `plain`: as a plain backend runs it (prepare(model), then run(inputs)):
    compile_model with no shapes bound and no inputs fixed, one object for every data
    set, which specializes on what each call brings (compiler.specialize)."""
    from compiler.driver import compile_model
    from ir.errors import UnsupportedError

    op = _op_of(case, _op_names())
    try:
        model, data_sets = _light_model(case) if case.model is None else (case.model, case.data_sets)
        inits = {t.name for t in model.graph.initializer}
        names = [vi.name for vi in model.graph.input if vi.name not in inits]
        if plain:
            compiled, fixed = compile_model(model, name="case"), {}
        else:
            compiled, fixed = _compile(model, names, data_sets[0][0])
    except UnsupportedError as e:
        return Outcome(case.name, op, "unsupported", str(e).splitlines()[-1].strip())
    except Exception as e:  # a claimed op that does not import or compile
        return Outcome(
            case.name, op, "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
    try:
        for inputs, expected in data_sets:
            given = dict(zip(names, inputs))
            if any(not np.array_equal(_normalize(given[n]), v) for n, v in fixed.items()):
                compiled, fixed = _compile(model, names, inputs)  # other values: specialize again
            got = compiled.run(*[_normalize(x) for n, x in zip(names, inputs) if n not in fixed])
            expected = [_normalize(x) for x in expected]
            if len(got) != len(expected):
                return Outcome(case.name, op, "failed", f"{len(got)} outputs, expected {len(expected)}")
            for i, (g, e) in enumerate(zip(got, expected)):
                if g.shape != e.shape or g.dtype != e.dtype:
                    return Outcome(
                        case.name,
                        op,
                        "failed",
                        f"output {i}: {g.dtype}{list(g.shape)}, expected {e.dtype}{list(e.shape)}",
                    )
                if e.dtype.kind in "fc":
                    np.testing.assert_allclose(g, e, rtol=case.rtol, atol=case.atol)
                else:
                    np.testing.assert_array_equal(g, e)
    except AssertionError as e:
        lines = [ln for ln in str(e).splitlines() if "Max" in ln or "Mismatch" in ln]
        return Outcome(case.name, op, "failed", "; ".join(lines) or "values differ")
    except UnsupportedError as e:  # --plain: a model that specializes compiles on its first run
        return Outcome(case.name, op, "unsupported", str(e).splitlines()[-1].strip())
    except Exception as e:
        return Outcome(case.name, op, "failed", f"{type(e).__name__}: {e}")
    return Outcome(case.name, op, "passed")


def _worker(conn) -> None:
    import warnings

    warnings.simplefilter("ignore")
    cases = _cases()
    while True:
        message = conn.recv()
        if message is None:
            return
        name, plain = message
        try:
            conn.send(run_case(cases[name], plain))
        except Exception:
            conn.send(Outcome(name, "?", "failed", traceback.format_exc().splitlines()[-1]))


def _receive(conn) -> Outcome | None:
    """The worker's answer if one is ready; None if not yet, or if the worker died."""
    try:
        return conn.recv() if conn.poll(0.01) else None
    except (EOFError, OSError):
        return None


class _Pool:
    """Worker processes that survive their cases: a dead or stuck worker is replaced."""

    def __init__(self, size: int, plain: bool = False):
        self.plain = plain
        self.ctx = mp.get_context("spawn")
        self.workers = [self._start() for _ in range(size)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        return proc, parent

    def run(self, names: list[str], ops: dict[str, str], progress) -> list[Outcome]:
        pending, results = list(names), []
        busy: dict[int, tuple[str, float]] = {}  # worker → (case, start time)
        while pending or busy:
            for i, (_, conn) in enumerate(self.workers):
                if i not in busy and pending:
                    name = pending.pop(0)
                    conn.send((name, self.plain))
                    busy[i] = (name, time.monotonic())
            for i, (name, started) in list(busy.items()):
                proc, conn = self.workers[i]
                answer = _receive(conn)
                if answer is not None:
                    results.append(answer)
                elif not proc.is_alive() or time.monotonic() - started > CASE_TIMEOUT_SECONDS:
                    reason = "timed out" if proc.is_alive() else f"crashed (exit {proc.exitcode})"
                    proc.kill()
                    results.append(Outcome(name, ops[name], "failed", reason))
                    self.workers[i] = self._start()
                else:
                    continue
                del busy[i]
                progress(results[-1])
        for _, conn in self.workers:
            conn.send(None)
        return results


def report(results: list[Outcome]) -> str:
    by_op: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, str] = {}
    for r in results:
        by_op[r.op][r.status] += 1
        if r.status != "passed":
            reasons.setdefault(r.op, r.reason)
    lines = [f"{'op':<32} {'passed':>6} {'failed':>6} {'unsup.':>6}  first reason"]
    for op in sorted(by_op):
        c = by_op[op]
        lines.append(
            f"{op:<32} {c['passed']:>6} {c['failed']:>6} {c['unsupported']:>6}  {reasons.get(op, '')[:90]}"
        )
    total = Counter(r.status for r in results)
    lines.append(f"{total['unsupported']} unsupported (ops Kiln does not claim)")
    lines.append(f"{total['passed']} passed, {total['failed']} failed")
    return "\n".join(lines)


README_BEGIN = "<!-- onnx-op-table: generated by python -m frontends.conformance --readme README.md -->"
README_END = "<!-- onnx-op-table end -->"


def op_table(results: list[Outcome]) -> str:
    """The README's table: every ONNX op with a passing case, how Kiln takes it, its
    counts, and why the rest of its cases are not supported."""
    from frontends.onnx.ops import CONVERTERS

    by_op: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    dtypes: dict[str, set[str]] = defaultdict(set)
    for r in results:
        if r.op.startswith("(model)"):
            continue
        by_op[r.op][r.status] += 1
        if r.status == "unsupported":
            kind, dtype = _reason_kind(r.reason)
            reasons[r.op][kind] += 1
            if dtype:
                dtypes[r.op].add(dtype.lower())
    lines = [
        README_BEGIN,
        "| ONNX op | imported as | cases passed | cases not supported (why) |",
        "|---|---|---|---|",
    ]
    for op in sorted(by_op, key=str.lower):
        c = by_op[op]
        if not c["passed"]:
            continue
        how = "Kiln op" if op in CONVERTERS else "ONNX function body"
        why = ", ".join(
            f"{n} {kind}" + (f" ({', '.join(sorted(dtypes[op]))})" if kind == "other dtypes" else "")
            for kind, n in reasons[op].most_common()
        )
        lines.append(f"| {op} | {how} | {c['passed']} | {why} |")
    total = Counter(r.status for r in results)
    models = [r for r in results if r.op.startswith("(model)")]
    lines += [
        "",
        f"{total['passed']} of {len(results)} cases pass ({sum(r.status == 'passed' for r in models)} of "
        f"{len(models)} real models), {total['failed']} fail; "
        f"{sum(1 for c in by_op.values() if not c['passed'])} other ONNX ops have no supported case.",
        README_END,
    ]
    return "\n".join(lines)


def _reason_kind(reason: str) -> tuple[str, str | None]:
    """A short class of an unsupported case's reason for the table, and the dtype it names."""
    if "has dtype" in reason:
        return "other dtypes", reason.split("has dtype ")[1].split(";")[0]
    if "cast to " in reason:
        return "other dtypes", reason.split("cast to ")[1].split(" ")[0]
    if "only 2-D" in reason:
        return "3-D", None
    if "function bodies" in reason:
        return "body not inlinable", None
    if "unsupported node(s): " in reason:
        ops = sorted({part.split("(")[-1].split(",")[0] for part in reason.split(": ", 1)[1].split("; ")})
        return "needs op " + ", ".join(ops), None
    if "must be a constant" in reason:
        return "run-time shape inputs", None
    if "not supported" in reason:
        return reason.split(": ")[-1].split(" (")[0].replace(" is not supported", "").replace(
            " are not supported", ""
        )[:50], None
    return reason[:40], None


def update_readme(path: Path, results: list[Outcome]) -> None:
    text = path.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    path.write_text(text[:start] + op_table(results) + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", default="", help="only cases whose name contains this")
    p.add_argument("-j", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--failures", action="store_true", help="list every failed case with its reason")
    p.add_argument("--readme", type=Path, help="rewrite the op table in this README with this run's counts")
    p.add_argument(
        "--plain", action="store_true", help="as a plain backend: prepare(model) then run(inputs), no hints"
    )
    args = p.parse_args(argv)
    cases = _cases()
    names = sorted(n for n in cases if args.k in n)
    op_names = _op_names()
    ops = {n: _op_of(cases[n], op_names) for n in names}
    done = [0]

    def progress(outcome: Outcome) -> None:
        done[0] += 1
        if done[0] % 100 == 0:
            print(f"  {done[0]}/{len(names)}", file=sys.stderr)

    results = _Pool(max(1, args.j), args.plain).run(names, ops, progress)
    print(report(results))
    if args.readme:
        update_readme(args.readme, results)
    if args.failures:
        for r in sorted(results, key=lambda r: r.name):
            if r.status == "failed":
                print(f"FAILED {r.name} [{r.op}]: {r.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
