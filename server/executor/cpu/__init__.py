"""The NumPy CPU reference executor (the embedded default backend)."""

from server.executor.cpu.executor import CpuExecutor

__all__ = ["CpuExecutor"]
