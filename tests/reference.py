"""The tests' references: pgen.reference is the one float64 NumPy reference of every kernel."""

from pgen.reference import *  # noqa: F401,F403
from pgen.reference import attend, cache_write, copy_blocks, decode, extend, gather_kv  # noqa: F401
