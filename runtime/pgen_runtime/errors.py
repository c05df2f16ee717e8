"""The one error hierarchy of pgen and its runtime.

Every error a user can cause is a `PgenError`; its message names the parameter, the value and the
fix. The compiler (`pgen`) re-exports these classes, so `pgen.SpecError is pgen_runtime.SpecError`.
"""

from __future__ import annotations


class PgenError(Exception):
    """Base class of every error pgen raises on purpose."""


class SpecError(PgenError, ValueError):
    """An attention spec (or a spec file) holds an invalid value."""


class ShapeError(PgenError, ValueError):
    """A kernel argument has the wrong shape, dtype, device or value range."""


class BuildError(PgenError):
    """Lowering or compiling a kernel failed."""


class TuneError(PgenError):
    """A tuning run or a tuning log is unusable (corrupt, or for another spec or target)."""


class PackageError(PgenError):
    """A package is missing, tampered with, truncated or does not fit this host."""


class OutOfBlocksError(PgenError):
    """The KV block pool cannot satisfy a request, now or ever."""


class SequenceError(PgenError, KeyError):
    """An operation names a sequence that does not exist, or one that already exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelImportError(PgenError):
    """An ONNX graph cannot be rewritten to the paged cache."""


class ConfigError(PgenError, ValueError):
    """A runtime setting (KV cache manager, preemption policy) holds an invalid value."""
