"""Kiln's exception types: each names what is wrong and where."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""


class GraphError(KilnError, ValueError):
    """A graph is malformed: a type that does not check, an SSA violation, a bad attribute."""


class UnsupportedError(KilnError, NotImplementedError):
    """The input uses something Kiln does not implement (an op, a dtype, a feature)."""


class CompileError(KilnError, RuntimeError):
    """Native code generation or linking failed."""


class InternalCompilerError(KilnError, RuntimeError):
    """Kiln failed on a model it should compile: a bug in Kiln, not in the model."""


@contextmanager
def internal_errors(where: str) -> Iterator[None]:
    """Turn an unexpected exception raised inside into an InternalCompilerError naming
    `where` (the stage, node or kernel): Kiln's own errors pass through unchanged."""
    try:
        yield
    except KilnError:
        raise
    except Exception as e:
        raise InternalCompilerError(
            f"internal compiler error while {where}: {type(e).__name__}: {e} "
            "(a bug in Kiln, not in the model)"
        ) from e
