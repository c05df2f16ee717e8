"""pgen.onnx: serve a standard ONNX decoder export (past/present KV) with the paged KV cache.

`rewrite` finds each layer's attention + past-KV pattern and replaces it with one
`pgen.PagedAttention` node; `relax_import` converts the result with TVM's ONNX frontend and a
converter for that node; `compile` builds the model library and writes a package.
"""

from __future__ import annotations

from .compile import compile_model
from .attention import Layer
from .rewrite import Rewritten, rewrite

__all__ = ["Layer", "Rewritten", "compile_model", "rewrite"]
