"""Kiln's exception types: each names what is wrong and where."""


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""


class GraphError(KilnError, ValueError):
    """A graph is malformed: a type that does not check, an SSA violation, a bad attribute."""


class UnsupportedError(KilnError, NotImplementedError):
    """The input uses something Kiln does not implement (an op, a dtype, a feature)."""


class CompileError(KilnError, RuntimeError):
    """Native code generation or linking failed."""
