"""Bounds-checked builds: an assert before every buffer access of the lowered code.

`BuildTarget(bounds_checks=True)` compiles through the `pgen_bounds_checked` TIR pipeline: TVM's
own, then `instrument` below, which puts before every statement that reads or writes a buffer an
`IndexError` assert that every index lies inside that buffer. A kernel that would read or write
out of bounds then raises, naming the function, the buffer and the index expression, instead of
reading another allocation's bytes on one host and faulting on another.

NOTE: TVM 0.27's `tirx.instrument_bound_checkers` option checks nothing: its pass reads bounds
that only the old StorageFlatten recorded. This pass runs on the flattened code instead, where
every buffer has one index and one extent.

Loads in the branch of an `if_then_else` are checked under its condition (a guarded read past
the end is the idiom for padding), and addresses taken for prefetches are not checked (a
prefetch never faults).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx.buffer import BufferType

PIPELINE = "pgen_bounds_checked"


def instrument(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    """`func` with an assert before each statement that accesses a buffer out of its bounds."""

    def checked(stmt, exprs, writes=()):
        conds = [c for e in exprs for c in _checks(e)]
        conds += [c for buffer, indices in writes for c in _index_checks(buffer, indices, [])]
        if not conds:
            return stmt
        # NOTE: TVM 0.27's Python AssertStmt passes (kind, condition) to a constructor that takes
        # (condition, kind); its FFI constructor is called directly.
        asserts = [tirx._ffi_api.AssertStmt(cond, tvm.ir.StringImm("IndexError"),
                                            [tvm.ir.StringImm(f"pgen bounds check: {name} {what}")], None)
                   for cond, what in conds]
        return tirx.SeqStmt([*asserts, stmt])

    def store(s):
        return checked(s, [s.value, *s.indices], [(s.buffer, s.indices)])

    return tvm_ffi.structural_map(func, [
        (tirx.BufferStore, store),
        (tirx.Bind, lambda s: checked(s, [s.value])),
        (tirx.IfThenElse, lambda s: checked(s, [s.condition])),
        (tirx.For, lambda s: checked(s, [s.min, s.extent])),
        (tirx.Evaluate, lambda s: checked(s, [s.value])),
    ])


def _checks(expr) -> list[tuple[tirx.PrimExpr, str]]:
    """(condition, description) for every buffer read in `expr`, under the guards that reach it."""
    out: list[tuple[tirx.PrimExpr, str]] = []
    guards: list[tirx.PrimExpr] = []

    def load(node, visitor):
        out.extend(_index_checks(node.source, node.indices, guards))
        for index in node.indices:
            visitor.visit(index)

    def call(node, visitor):
        op = getattr(node.op, "name", "")
        if op == "tirx.address_of" or op.endswith("prefetch"):
            return  # an address, not a read
        if op == "prim.if_then_else":
            cond, then, other = node.args
            visitor.visit(cond)
            for guard, branch in ((cond, then), (tirx.Not(cond), other)):
                guards.append(guard)
                visitor.visit(branch)
                guards.pop()
            return
        visitor.default_visit(node)

    def let(node, visitor):
        visitor.visit(node.value)
        start = len(out)
        visitor.visit(node.body)
        # A check inside the Let's body may use its variable: bind it around the check.
        out[start:] = [(tirx.Let(node.var, node.value, cond), what) for cond, what in out[start:]]

    tvm_ffi.structural_visit(expr, [(tvm.ir.expr.TensorLoad, load), (tvm.ir.expr.Call, call), (tirx.Let, let)])
    return out


def _index_checks(buffer, indices, guards) -> list[tuple[tirx.PrimExpr, str]]:
    if not isinstance(buffer.ty, BufferType) or len(indices) != len(buffer.shape):
        return []
    out = []
    for index, extent in zip(indices, buffer.shape):
        if isinstance(index, tirx.Ramp):
            last = index.base + index.stride * (index.lanes - 1)
            lo, hi = tirx.min(index.base, last), tirx.max(index.base, last)
        elif isinstance(index, tirx.Broadcast):
            lo = hi = index.value
        else:
            lo = hi = index
        dtype = hi.ty.dtype
        if dtype.lanes != 1:
            continue  # a gathered vector index: no scalar bound to state
        extent = tirx.Cast(str(dtype), extent) if extent.ty.dtype != dtype else extent
        cond = tirx.all(lo >= tirx.const(0, str(dtype)), hi < extent)
        for guard in reversed(guards):
            cond = tirx.Or(tirx.Not(guard), cond)
        if isinstance(cond, tirx.IntImm) and cond.value:
            continue
        out.append((cond, f"accesses {buffer.name}[{index}] outside [0, {extent})"))
    return out


def _pipeline_factory(**kwargs):
    inner, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir", **kwargs)

    @tvm.transform.module_pass(opt_level=0, name="pgen.InstrumentBounds")
    def bounds(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc):
                mod[gvar] = instrument(func, gvar.name_hint)
        return mod

    return tvm.transform.Sequential([inner, bounds]), finalize_host, finalize_device


tvm.tirx.register_tir_pipeline(PIPELINE, _pipeline_factory)
