"""Relax import of a rewritten export: TVM's ONNX frontend plus a converter for `pgen.PagedAttention`.

The converter writes the new K/V into the layer's pool in place (`R.call_tir_inplace` on the pool
argument, through pgen's `cache_write` kernel) and runs attention through pgen's `extend` kernel,
which also serves decode (one new token per sequence), split over the KV as the runtime plans
(the `kv_splits` input). Both kernels come from the same schedule rules and configs as the
packaged kernel library, so model and kernels agree on the pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from pgen_runtime.errors import BuildError, ModelImportError
from pgen_runtime.spec import AttentionSpec

from ..schedules import cpu_dense, rule_for
from ..target import BuildTarget
from .rewrite import OP


@dataclass(slots=True)
class _Kernels:
    """The PrimFuncs one import adds to the module, added once and shared by every layer."""

    spec: AttentionSpec
    target: BuildTarget
    configs: dict[str, dict]
    added: dict[str, relax.GlobalVar] = field(default_factory=dict)

    def global_var(self, bb: relax.BlockBuilder, name: str) -> relax.GlobalVar:
        if name not in self.added:
            func = rule_for(name, self.target.kind).apply(self.spec, self.target.info, self.configs[name])
            if func is None:
                raise BuildError(f"the {name} rule does not apply to {self.spec.uri} on {self.target.name}")
            if name == "extend":
                func = _bind_launch_args(func, self.configs[name].get("q_tile", 1))
            self.added[name] = bb.add_func(func.without_attr("global_symbol"), f"pgen_{name}")
        return self.added[name]


_active: list[_Kernels] = []


class PagedAttention(onnx_frontend.OnnxOpConverter):
    """`pgen.PagedAttention(q, k, v, kv_pool, block_tables, slot_mapping, q_indptr, seq_lens, kv_splits)`.

    q [1, Hq, T, D], k/v [1, Hkv, T, D] (the export's layout with the flattened batch of one);
    kv_splits [S]: extend's split-KV factor is its length S; returns [1, Hq, T, D].
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        kernels = _active[-1]
        spec = kernels.spec
        if (attr["num_q_heads"], attr["num_kv_heads"], attr["head_dim"]) != (
                spec.num_q_heads, spec.num_kv_heads, spec.head_dim):
            raise ModelImportError(f"layer {attr.get('layer')} has heads/head_dim "
                                   f"{attr['num_q_heads']}/{attr['num_kv_heads']}/{attr['head_dim']} but the model's "
                                   f"spec is {spec.uri}; pgen builds one spec per model")
        q, k, v, pool, tables, slots, indptr, lens, splits = inputs
        q, k, v = (bb.emit(relax.op.permute_dims(relax.op.squeeze(x, [0]), [1, 0, 2])) for x in (q, k, v))
        pool = bb.emit(relax.call_tir_inplace(kernels.global_var(bb, "cache_write"), [k, v, pool, slots],
                                              [2], pool.ty))
        tokens = q.ty.shape[0]
        num_splits = relax.prim_value(tvm.tirx.Cast("int32", splits.ty.shape[0]))
        out = bb.emit(relax.call_tir(kernels.global_var(bb, "extend"), [q, pool, tables, indptr, lens, num_splits],
                                     relax.TensorType([tokens, spec.num_q_heads, spec.head_dim], spec.dtype)))
        return relax.op.expand_dims(relax.op.permute_dims(out, [1, 0, 2]), [0])


def _bind_launch_args(func: tvm.tirx.PrimFunc, q_tile: int) -> tvm.tirx.PrimFunc:
    """extend as `R.call_tir` calls it: max_q_tiles bound, num_splits (the length of the model's
    kv_splits input) moved before `out`, since call_tir passes its arguments, then the output.

    NOTE: max_q_tiles = ceil(T / q_tile) for T rows of q: an upper bound, since the kernel skips
    the q tiles past each sequence's new tokens.
    """
    params = {p.name: p for p in func.params}
    tokens = func.params[0].shape[0]  # TVM 0.27: buffer params are the buffers
    func = func.specialize({params["max_q_tiles"]: tvm.tirx.floordiv(tokens + q_tile - 1, q_tile)})
    *inputs, out, num_splits = func.params
    return tvm.tirx.PrimFunc([*inputs, num_splits, out], func.body, func.ret_type, func.attrs)


@contextlib.contextmanager
def _converter(kernels: _Kernels) -> Iterator[None]:
    """Make TVM's ONNX frontend convert PagedAttention nodes with `kernels` (the frontend ignores domains)."""
    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), OP: PagedAttention}
    _active.append(kernels)
    try:
        yield
    finally:
        _active.pop()
        onnx_frontend._get_convert_map = original


def import_model(model: onnx.ModelProto, spec: AttentionSpec, target: BuildTarget,
                 configs: dict[str, dict]) -> tvm.IRModule:
    """Relax module of a rewritten model, its weights embedded as constants.

    Raises:
        ModelImportError: TVM's frontend cannot convert a node; the message names it.
    """
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
              for i in model.graph.input}
    with _converter(_Kernels(spec, target, configs)):
        try:
            return onnx_frontend.from_onnx(model, dtype_dict=dtypes, keep_params_in_input=False)
        except ModelImportError:
            raise
        except Exception as err:  # TVM raises TVMError/ValueError/NotImplementedError alike
            raise ModelImportError(f"TVM's ONNX frontend failed on the rewritten graph: {err}") from err


def build_executable(mod: tvm.IRModule, target: BuildTarget):
    """tvm.compile for the target with pgen's model pipeline; returns the Relax executable."""
    tvm_target = tvm.target.Target(target.tvm_target())
    try:
        return tvm.compile(mod, target=tvm_target, relax_pipeline=model_pipeline(target))
    except Exception as err:
        raise BuildError(f"compiling the model for {target.name} failed: {err}") from err


def model_pipeline(target: BuildTarget) -> tvm.transform.Pass:
    """TVM's "zero" pipeline (legalize, fold, fuse), pgen's dense-layer schedule, then TVM's default.

    NOTE: `tvm.compile`'s default pipeline for a CPU target neither fuses nor schedules anything:
    every Relax op becomes its own scalar, single-threaded loop nest. Here elementwise tails fuse
    into the matmul before them (bias, residual add, SiLU gating), and `schedules.cpu_dense` gives
    every dense layer a parallel, register-tiled, vectorized schedule. The default pipeline's own
    dispatch and legalization then find nothing left to do.
    """
    from tvm.relax import backend

    @tvm.transform.module_pass(opt_level=0, name="pgen.ScheduleDense")
    def schedule_dense(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                scheduled = cpu_dense.apply(func, target.info)
                if scheduled is not None:
                    mod[gvar] = scheduled
        return mod

    # Sampling and sort/scan ops dispatch to their library kernels before "zero" legalizes them.
    return tvm.transform.Sequential([backend.DispatchSampling(), backend.DispatchSortScan(),
                                     relax.get_pipeline("zero"), schedule_dense, relax.get_pipeline("default")],
                                    name="pgen.model_pipeline")
