"""`kiln`: the command line over compiler.compile_model and the runtime.

Errors a user can cause (a bad file, an unsupported op, a wrong input) print one
line, `kiln: error: ...`, and exit with code 2; no traceback. A failure inside Kiln
itself prints `kiln: internal compiler error while ...` and exits with code 3.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ir.errors import InternalCompilerError, KilnError


def _version() -> str:
    try:
        return version("kiln")
    except PackageNotFoundError:
        return "unknown"


def _shape_binding(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=DxDx... (e.g. input=1x3x224x224), got {text!r}"
        ) from None


def _dim_bound(text: str) -> tuple[str, int]:
    """NAME or NAME=1..MAX: a dimension a library takes at run time, and its bound."""
    name, sep, bounds = text.partition("=")
    low, dots, high = bounds.partition("..")
    try:
        if not name or (sep and (not dots or int(low) != 1 or int(high) < 1)):
            raise ValueError
        return name, int(high) if sep else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=1..MAX (N=1..256), got {text!r}") from None


def _dim_value(text: str) -> tuple[str, int]:
    """NAME=SIZE: a named dimension fixed to one size."""
    name, sep, size = text.partition("=")
    try:
        if not name or not sep or int(size) < 1:
            raise ValueError
        return name, int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE (S=128), got {text!r}") from None


def _fix_dims(model: str, sizes: dict[str, int]):
    """The ONNX model with these named dimensions of its inputs given one size each."""
    from compiler.specialize import bind_dims
    from frontends.onnx import load_model

    proto = load_model(model)
    named = {d.dim_param for vi in proto.graph.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
    unknown = sorted(set(sizes) - named)
    if unknown:
        raise ValueError(
            f"--fix-dim {', '.join(unknown)}: no input names it (named: {', '.join(sorted(named)) or 'none'})"
        )
    return bind_dims(proto, sizes)


def _compile(args: argparse.Namespace) -> int:
    from compiler.driver import compile_model

    if args.train or str(args.model).endswith(".keras"):
        return _compile_keras(args)
    source = _fix_dims(args.model, dict(args.fix_dim)) if args.fix_dim else args.model
    out = Path(args.output)
    name = args.name or out.stem
    emit = tuple(k for k in args.emit or () if k != "ptx")
    if args.target == "cuda" and emit:
        raise ValueError(f"--target cuda has no CPU code to emit ({', '.join(emit)}); --emit ptx writes PTX")
    ptx = "ptx" in (args.emit or ())
    written = _write_ptx(args, out, name) if ptx and args.target != "cuda" else []
    model = compile_model(
        source,
        target=args.target,
        name=name,
        fuse=not args.no_fuse,
        input_shapes=dict(args.input_shape or []),
        emit=emit,
        cpu_name=args.cpu,
        specialize=False,  # a library has fixed shapes: say what to bind
        dims=dict(args.dim or []),
    )
    dynamic = {getattr(model, "batch_dim", None), getattr(model, "sequence_dim", None)} - {None}
    for dim, _ in args.dim or []:
        if dim not in dynamic:
            found = ", ".join(sorted(dynamic)) or "none"
            raise ValueError(f"--dim {dim}: the model's dimensions for any size are {found}")
    so = model.save(out)
    for kind in emit:
        ext = {"llvm": ".ll", "asm": ".s"}[kind]
        src = model.path.with_suffix(ext)
        so.with_suffix(ext).write_text(src.read_text())
    if ptx and args.target == "cuda":
        for image in sorted(model.path.parent.glob(f"{model.name}.sm_*.ptx")):  # written beside the build
            path = so.with_suffix(image.name.removeprefix(model.name))
            path.write_text(image.read_text())
            written.append(path)
    print(
        f"wrote {so} and {so.with_name(name + '.h')}"
        + "".join(f", {so.with_suffix({'llvm': '.ll', 'asm': '.s'}[k])}" for k in emit)
        + "".join(f", {path}" for path in written)
    )
    return 0


def _write_ptx(args: argparse.Namespace, out: Path, name: str) -> list[Path]:
    """OUT.sm_80.ptx and OUT.sm_90.ptx: the model's GPU kernels, one module per architecture."""
    from compiler.driver import gpu_modules, lower_graph, to_graph

    if args.target == "cpu":
        raise ValueError("--emit ptx needs a GPU target: --target cuda or cuda-sim")
    graph = to_graph(args.model, dict(args.input_shape or []))
    lowered = lower_graph(graph, name, fuse=not args.no_fuse, target=args.target)
    written = []
    for arch, ptx in gpu_modules(lowered).items():
        path = out.with_suffix(f".{arch}.ptx")
        path.write_text(ptx)
        written.append(path)
    return written


def _compile_keras(args: argparse.Namespace) -> int:
    """A .keras file: its inference library, or with --train its training library."""
    from frontends.keras.models import load_model

    if not str(args.model).endswith(".keras"):
        raise ValueError(f"--train compiles a Keras model (.keras file), got {args.model}")
    if not Path(args.model).is_file():
        raise ValueError(f"{args.model}: no such file")
    model = load_model(args.model)
    out = Path(args.output)
    if args.target == "cuda" and args.cpu:
        raise ValueError("--target cuda has no CPU code: --cpu is for the CPU targets")
    if args.train:
        so = model.export_train(out, batch_size=args.batch_size, cpu=args.cpu, target=args.target)
        print(f"wrote {so} and {so.with_name(so.stem + '.h')} (training step, batch {args.batch_size})")
    else:
        so = model.export(out, batch_size=args.batch_size, cpu=args.cpu, target=args.target)
        print(f"wrote {so} and {so.with_name(so.stem + '.h')}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from runtime import load

    model = load(args.library, args.name)
    if args.target is not None and (args.target == "cuda") != (model.target == "cuda"):
        built = "for the GPU (cuda)" if model.target == "cuda" else "for the CPU (cpu or cuda-sim)"
        raise KilnError(f"{args.library} was compiled {built}, not for --target {args.target}")
    feeds = {}
    for item in args.input or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise KilnError(f"--input expects NAME=FILE.npy, got {item!r}")
        try:
            feeds[name] = np.load(path)
        except (OSError, ValueError) as e:
            raise KilnError(f"--input {name}: cannot read {path}: {e}") from None
    outputs = model.run(**feeds)
    named = {t.name: a for t, a in zip(model.outputs, outputs)}
    if args.output:
        np.savez(args.output, **named)
        print(f"wrote {args.output}")
    else:
        for name, a in named.items():
            print(f"{name}: {a.dtype}{list(a.shape)}\n{a}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from compiler.driver import lower_graph, to_graph
    from compiler.passes import Pass
    from compiler.report import dot_source, gpu_table, kernels_table, memory_table, render_dot
    from ir.graph import Graph

    graph = to_graph(args.model, dict(args.input_shape or []))
    after_pass = None
    if args.print_after_all:
        print(f"// as imported\n{graph}\n")

        def after_pass(p: Pass, g: Graph) -> None:
            print(f"// after {p.name}: {p.purpose}\n{g}\n")

    lowered = lower_graph(graph, args.name, fuse=not args.no_fuse, target=args.target, after_pass=after_pass)
    print(lowered.graph)
    print()
    print(kernels_table(lowered, with_ir=args.kernels))
    if args.target != "cpu":
        print()
        print(gpu_table(lowered))
    print(f"\nmemory: {lowered.plan.report()}")
    if args.memory:
        print(memory_table(lowered))
    if args.dot:
        Path(args.dot).write_text(dot_source(lowered))
        svg = render_dot(Path(args.dot))
        print(f"wrote {args.dot}" + (f" and {svg}" if svg else " (install graphviz's dot for an SVG)"))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from compiler.bench import bench, table
    from compiler.driver import to_graph
    from frontends.onnx.importer import load_model

    bindings = dict(args.input_shape or [])
    if args.batch:
        proto = load_model(args.model)
        initializers = {t.name for t in proto.graph.initializer}
        for vi in proto.graph.input:
            if vi.name not in initializers and vi.name not in bindings:
                dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
                bindings[vi.name] = (args.batch, *dims[1:])
    graph = to_graph(args.model, bindings)
    modes = (True, False) if args.compare_fusion else (True,)
    results = bench(graph, "bench", modes, args.threads, args.repeats, target=args.target)
    if args.json:
        print(json.dumps({("fused" if f else "unfused"): r.as_dict() for f, r in results.items()}))
    else:
        print(table([(Path(args.model).name, results)]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from compiler.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: compile neural networks to native code.")
    p.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compile",
        help="compile an ONNX model to a shared library + header",
        description="Compile MODEL.onnx into OUT.so (C ABI) and NAME.h.",
    )
    c.add_argument("model", help="the ONNX file")
    c.add_argument("-o", "--output", required=True, help="the library to write (OUT.so)")
    c.add_argument("--name", help="C symbol prefix (default: OUT's stem)")
    c.add_argument("--no-fuse", action="store_true", help="one kernel per op (the unfused baseline)")
    c.add_argument(
        "--target",
        choices=["cpu", "cuda", "cuda-sim"],
        default="cpu",
        help="cpu (default); cuda: a library that runs on an NVIDIA GPU (it opens the CUDA driver at "
        "run time; no GPU needed to compile); cuda-sim: a CPU library that runs the GPU-scheduled "
        "kernels exactly, to check a GPU build without a GPU",
    )
    c.add_argument(
        "--emit",
        action="append",
        choices=["llvm", "asm", "ptx"],
        help="also write the optimized LLVM IR (.ll), assembly (.s), or for a GPU target the PTX of "
        "each architecture (OUT.sm_80.ptx, OUT.sm_90.ptx)",
    )
    c.add_argument(
        "--input-shape",
        action="append",
        type=_shape_binding,
        metavar="NAME=DxD...",
        help="bind an input's shape (for symbolic dimensions)",
    )
    c.add_argument(
        "--dim",
        action="append",
        type=_dim_bound,
        metavar="NAME[=1..MAX]",
        help="a named dimension the library takes in any size, bounded by MAX: the batch (without --dim, "
        "a model whose inputs name one dimension gets one library for every size of it, where it can), "
        "or with a bound a sequence beside the batch (N and S of a transformer: --dim N=1..256 --dim "
        "S=1..512), padded to a few lengths and attention's padded keys masked",
    )
    c.add_argument(
        "--fix-dim",
        action="append",
        type=_dim_value,
        metavar="NAME=SIZE",
        help="give a named dimension one size in every input (S=128), leaving the others named",
    )
    c.add_argument("--cpu", help="target this LLVM CPU (e.g. x86-64-v3) instead of the host's")
    c.add_argument(
        "--train",
        action="store_true",
        help="for a .keras model: a library that trains it (NAME_trainer_create, NAME_train_step, ...)",
    )
    c.add_argument("--batch-size", type=int, default=32, help="the batch size of a .keras model's library")
    c.set_defaults(func=_compile)

    r = sub.add_parser(
        "run",
        help="run a compiled library on .npy inputs",
        description="Run OUT.so on inputs from .npy files.",
    )
    r.add_argument("library", help="the .so from `kiln compile`")
    r.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input (repeat per input)")
    r.add_argument("-o", "--output", help="write the outputs to this .npz (default: print them)")
    r.add_argument("--name", help="the model's C prefix (default: the library's file stem)")
    r.add_argument(
        "--target",
        choices=["cpu", "cuda", "cuda-sim"],
        help="the target the library must have been compiled for (a CUDA library runs on the GPU)",
    )
    r.set_defaults(func=_run)

    i = sub.add_parser(
        "inspect",
        help="show the IR, the kernels and the memory plan",
        description="Print a model's graph IR, its kernels and its memory plan.",
    )
    i.add_argument("model", help="the ONNX file")
    i.add_argument("--name", default="model", help="C symbol prefix for kernel names")
    i.add_argument("--kernels", action="store_true", help="also print each kernel's loop nest")
    i.add_argument("--memory", action="store_true", help="print the memory plan, buffer by buffer")
    i.add_argument("--dot", metavar="FILE", help="write the fused graph for Graphviz (kernels as clusters)")
    i.add_argument("--no-fuse", action="store_true", help="show the unfused program (one kernel per op)")
    i.add_argument(
        "--print-after-all", action="store_true", help="print the graph as imported and after every pass"
    )
    i.add_argument(
        "--target",
        choices=["cpu", "cuda", "cuda-sim"],
        default="cpu",
        help="show the kernels as scheduled for this target; for a GPU target also each kernel's "
        "registers, shared memory and spills from ptxas",
    )
    i.add_argument("--input-shape", action="append", type=_shape_binding, metavar="NAME=DxD...")
    i.set_defaults(func=_inspect)

    bn = sub.add_parser(
        "bench",
        help="time a model: latency, kernels, bytes, arena; fused vs unfused",
        description="Compile MODEL.onnx and time it (median and p90 latency).",
    )
    bn.add_argument("model", help="the ONNX file")
    bn.add_argument("--compare-fusion", action="store_true", help="also time the unfused build, side by side")
    bn.add_argument("--threads", type=int, help="threads per run (default: all cores; not for cuda)")
    bn.add_argument(
        "--target",
        choices=["cpu", "cuda", "cuda-sim"],
        default="cpu",
        help="compile for this target (cuda: timed on the GPU, host copies included)",
    )
    bn.add_argument("--batch", type=int, help="bind every input's first dimension to this")
    bn.add_argument("--repeats", type=int, default=50, help="timed runs per build (at least)")
    bn.add_argument("--input-shape", action="append", type=_shape_binding, metavar="NAME=DxD...")
    bn.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bn.set_defaults(func=_bench)

    d = sub.add_parser(
        "demo",
        help="compile and run the bundled MNIST CNN from Python and from C",
        description="Compile the bundled MNIST CNN, run it from Python and from a "
        "C program built against its header, and compare both with "
        "the reference interpreter.",
    )
    d.add_argument("--workdir", help="keep the library, header and C program here")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InternalCompilerError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 3
    except (KilnError, FileNotFoundError, TypeError, ValueError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
