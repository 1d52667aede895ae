"""Kiln's compiler: graph passes, lowering, memory planning, the driver and the CLI."""

from compiler.driver import compile_model

__all__ = ["compile_model"]
