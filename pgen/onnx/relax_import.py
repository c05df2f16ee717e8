"""Relax import of a rewritten export: TVM's ONNX frontend plus a converter for `pgen.PagedAttention`.

The converter writes the new K/V into the layer's pool in place (`R.call_tir_inplace` on the pool
argument, through pgen's `cache_write` kernel) and runs attention through pgen's `extend` kernel,
which also serves decode (one new token per sequence), split over the KV as the runtime plans
(the `kv_splits` input). Both kernels come from the same schedule rules and configs as the
packaged kernel library, so model and kernels agree on the pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import tvm
from tvm import relax, te
from tvm.relax.frontend.onnx import onnx_frontend

from pgen_runtime.errors import BuildError, ModelImportError
from pgen_runtime.spec import AttentionSpec

from .. import schedules
from ..schedules import cpu_dense
from ..schedules.fast_math import fast_sigmoid, fast_tanh
from ..target import BuildTarget
from . import weights
from .rewrite import OP


@dataclass(slots=True)
class _Kernels:
    """The PrimFuncs one import adds to the module, added once and shared by every layer."""

    spec: AttentionSpec
    target: BuildTarget
    configs: dict[str, dict]
    added: dict[str, relax.GlobalVar] = field(default_factory=dict)

    def global_var(self, bb: relax.BlockBuilder, name: str, spec: AttentionSpec) -> relax.GlobalVar:
        """The kernel `name` for a layer of `spec` (the model's shape, the layer's window), built
        with the model's configs: every layer launches with the one split factor of the step."""
        key = f"pgen_{name}" + (f"_win{spec.sliding_window}" if spec.sliding_window != self.spec.sliding_window else "")
        if key not in self.added:
            func = schedules.schedule(name, spec, self.target.info, self.configs[name])
            if func is None:
                raise BuildError(f"rule {self.configs[name]['rule']} does not apply to {spec.uri} on {self.target.name}")
            if name == "extend":
                func = _bind_launch_args(func, self.configs[name].get("q_tile", 1))
            self.added[key] = bb.add_func(func.without_attr("global_symbol"), key)
        return self.added[key]


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
        window = attr.get("sliding_window")
        layer_spec = dataclasses.replace(spec, sliding_window=int(window) if window else None)
        q, k, v, pool, tables, slots, indptr, lens, splits = inputs
        for name, x in (("q", q), ("k", k), ("v", v)):
            if getattr(x.ty, "shape", None) is None:
                raise ModelImportError(
                    f"layer {attr.get('layer')}: TVM's ONNX frontend lost the shape of the attention's {name} "
                    "(the ops before it compute shapes at run time, e.g. a rotary table tiled by a shape "
                    "tensor); export with torch.onnx.export(..., dynamo=True), whose shapes fold")
        q, k, v = (bb.emit(relax.op.permute_dims(relax.op.squeeze(x, [0]), [1, 0, 2])) for x in (q, k, v))
        pool = bb.emit(relax.call_tir_inplace(kernels.global_var(bb, "cache_write", spec), [k, v, pool, slots],
                                              [2], pool.ty))
        tokens = q.ty.shape[0]
        num_splits = relax.prim_value(tvm.tirx.Cast("int32", splits.ty.shape[0]))
        out = bb.emit(relax.call_tir(kernels.global_var(bb, "extend", layer_spec), [q, pool, tables, indptr, lens, num_splits],
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


class _Gather(onnx_frontend.Gather):
    """TVM's Gather, also on a shape computed at run time (`Shape` of a value whose dims Relax does
    not know): TVM 0.27 converts only literal shapes to a tensor first and fails on the others."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data = inputs[0]
        if not isinstance(data, relax.ShapeExpr) and isinstance(getattr(data, "ty", None), relax.ShapeType):
            inputs = [bb.normalize(relax.op.shape_to_tensor(data)), *inputs[1:]]
        return super()._impl_v13(bb, inputs, attr, params)


class _Expand(onnx_frontend.Expand):
    """TVM's Expand, also to a constant shape of data with a dynamic dim (GPT-J's rotary
    `repeat_interleave`: [1, T, 1, d/2] -> [1, T, 2, d/2]): TVM 0.27 reads every data dim as a
    literal on that path; as a ShapeExpr the target takes its general broadcasting rules."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        if isinstance(shape, tvm.ir.expr.GenericConst) and shape.value.numpy().ndim == 1 and \
                not all(isinstance(d, tvm.tirx.IntImm) for d in data.ty.shape):
            target = relax.ShapeExpr([int(v) for v in shape.value.numpy().tolist()])
            return super()._impl_v13(bb, [data, target, *inputs[2:]], attr, params)
        return super()._impl_v13(bb, inputs, attr, params)


class _RotaryEmbedding(onnx_frontend.OnnxOpConverter):
    """ONNX `RotaryEmbedding(X, cos_cache, sin_cache[, position_ids])` (opset 23), which torch
    dynamo's exports of rotary models emit and TVM 0.27's frontend does not convert.

    X is [batch, heads, seq, head] or [batch, seq, heads * head] (with the `num_heads` attribute);
    the caches are [batch, seq, rot/2], or [max_pos, rot/2] rows gathered by position_ids. The
    first rot = `rotary_embedding_dim` (0: the whole head) dims of each head rotate, as halves or
    (`interleaved`) as pairs; the rest pass through. The caches broadcast over the heads where X
    has them, so a 4-D X is never transposed.
    """

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x, cos, sin, *rest = inputs
        shape, heads, head, rot = _rotary_dims(x, cos, attr)
        if len(shape) == 3:
            x = bb.emit(relax.op.reshape(x, [shape[0], shape[1], heads, head]))
        if rest and rest[0] is not None:  # position_ids: rows of [max_pos, rot/2] caches
            cos, sin = (bb.emit(relax.op.take(c, rest[0], axis=0)) for c in (cos, sin))
        # The caches are [batch, seq, rot/2]: the heads are X's axis 1 (4-D) or 2 (3-D, reshaped).
        cos, sin = (bb.emit(relax.op.expand_dims(c, [1 if len(shape) == 4 else 2])) for c in (cos, sin))

        def dims(begin: int, end: int, step: int = 1) -> relax.Expr:
            return bb.emit(relax.op.strided_slice(x, [3], [begin], [end], [step]))

        interleaved = attr.get("interleaved", 0)
        x1, x2 = (dims(0, rot, 2), dims(1, rot, 2)) if interleaved else (dims(0, rot // 2), dims(rot // 2, rot))
        real = bb.emit(relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2)))
        imag = bb.emit(relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2)))
        if interleaved:  # [.., rot/2, 2] pairs, back to [.., rot]
            pairs = bb.emit(relax.op.concat([relax.op.expand_dims(real, [4]), relax.op.expand_dims(imag, [4])], 4))
            rotated = bb.emit(relax.op.reshape(pairs, [*list(x.ty.shape)[:3], rot]))
        else:
            rotated = bb.emit(relax.op.concat([real, imag], 3))
        out = bb.emit(relax.op.concat([rotated, dims(rot, head)], 3)) if rot < head else rotated
        return relax.op.reshape(out, shape) if len(shape) == 3 else out


def _rotary_dims(x: relax.Expr, cos: relax.Expr, attr: dict) -> tuple[list, int, int, int]:
    """RotaryEmbedding's X shape, heads (of a 3-D X), head size and rotated dims, checked as the
    spec requires them.

    Raises:
        ModelImportError: X's rank or last dim is unknown, a 3-D X has no num_heads dividing its
            hidden size, the rotated dims are odd or past the head, or the cache's are not half.
    """
    shape = getattr(x.ty, "shape", None)
    if shape is None or len(shape) not in (3, 4) or not isinstance(shape[-1], tvm.tirx.IntImm):
        raise ModelImportError(f"RotaryEmbedding needs X of a known rank (3 or 4) and last dim, got {x.ty}")
    shape, heads = list(shape), attr.get("num_heads", 0)
    if len(shape) == 3 and (not heads or int(shape[2]) % heads):
        raise ModelImportError(f"RotaryEmbedding of a 3-D X [.., {shape[2]}] needs a num_heads attribute "
                               f"dividing {shape[2]}, got {heads}")
    head = int(shape[3]) if len(shape) == 4 else int(shape[2]) // heads
    rot = attr.get("rotary_embedding_dim", 0) or head
    half = getattr(cos.ty, "shape", None) and cos.ty.shape[-1]
    if rot % 2 or rot > head or (isinstance(half, tvm.tirx.IntImm) and int(half) != rot // 2):
        raise ModelImportError(f"RotaryEmbedding rotates {rot} dims of a head of {head} with caches of "
                               f"{half} columns: it needs an even count, at most the head, of twice the columns")
    return shape, heads, head, rot


@contextlib.contextmanager
def _converter(kernels: _Kernels) -> Iterator[None]:
    """Make TVM's ONNX frontend convert PagedAttention nodes with `kernels` (the frontend ignores
    domains), Gather and Expand with `_Gather` and `_Expand`, and RotaryEmbedding."""
    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), OP: PagedAttention, "Gather": _Gather,
                                              "Expand": _Expand, "RotaryEmbedding": _RotaryEmbedding}
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


def build_executable(mod: tvm.IRModule, target: BuildTarget, weight_dtype: str = "float32"):
    """tvm.compile for the target with pgen's model pipeline.

    Returns:
        `(executable, cubins)`: the Relax executable, and for a CUDA target `{arch: cubin}` of its
        device code (empty for llvm).
    """
    try:
        if target.kind == "cuda":
            from .. import cuda

            return cuda.build_cuda(mod, target.archs, relax_pipeline=cuda_model_pipeline(target, weight_dtype))
        tvm_target = tvm.target.Target(target.tvm_target())
        return tvm.compile(mod, target=tvm_target, relax_pipeline=model_pipeline(target, weight_dtype),
                           tir_pipeline=target.tir_pipeline), {}
    except BuildError:
        raise
    except Exception as err:
        raise BuildError(f"compiling the model for {target.name} failed: {err}") from err


def cuda_model_pipeline(target: BuildTarget, weight_dtype: str = "float32") -> tvm.transform.Pass:
    """The model pipeline of a CUDA target: checked gathers, the weights' dtype, then TVM's CUDA
    pipeline (legalize, fuse, dlight's GPU rules for every kernel pgen did not schedule itself,
    memory planning). pgen's attention kernels are marked scheduled, so dlight leaves them alone.

    `weight_dtype="float16"`: every matmul with a constant weight runs on fp16 weights and inputs
    (`weights.half_weights`), which dlight's matmul rule maps to tensor cores (sm_70 and later)
    with float32 accumulation.
    """
    from tvm.relax.backend import cuda as cuda_backend

    tvm_target = tvm.target.Target(target.tvm_target())
    rounding = [relax.transform.FoldConstant(), weights.half_weights(weight_dtype)] if weight_dtype != "float32" else []
    return tvm.transform.Sequential([checked_take(), drop_empty_concat_operands(), relax.transform.DeadCodeElimination(),
                                     *rounding, cuda_backend.get_default_pipeline(tvm_target)],
                                    name="pgen.cuda_model_pipeline")


def drop_empty_concat_operands() -> tvm.transform.Pass:
    """`concat` without its operands of size 0 along the axis (the one left, if one is).

    NOTE: a rotary over the whole head still concatenates the head's pass-through part,
    `x[..., rot:]` of width 0 (Phi-3's optimum export). The CPU loops over it zero times, but
    dlight's GPU fallback fuses the empty loop and divides by its extent (TVM 0.27: "Divide by
    zero" in FloorMod), so on CUDA the empty slice must not reach a kernel; DeadCodeElimination
    then removes it.
    """
    concat = tvm.ir.Op.get("relax.concat")

    def empty(x: relax.Expr, axis: int) -> bool:
        shape = getattr(x.ty, "shape", None)
        if shape is None:
            return False
        dim = shape[axis if axis >= 0 else len(shape) + axis]
        return isinstance(dim, tvm.tirx.IntImm) and dim.value == 0

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(concat) or not isinstance(call.args[0], relax.Tuple):
                return call
            fields, axis = list(call.args[0].fields), int(call.attrs.axis)
            kept = [f for f in fields if not empty(f, axis)]
            if len(kept) == len(fields) or not kept:
                return call
            return kept[0] if len(kept) == 1 else relax.op.concat(kept, axis)

    return _each_relax_function("pgen.DropEmptyConcatOperands", _Mutator)


def _each_relax_function(name: str, mutator) -> tvm.transform.Pass:
    """A module pass that rewrites every Relax function with a fresh `mutator()`."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def pass_(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = mutator().visit_expr(func)
        return mod

    return pass_


def model_pipeline(target: BuildTarget, weight_dtype: str = "float32") -> tvm.transform.Pass:
    """TVM's "zero" pipeline (legalize, fold, fuse), pgen's dense-layer schedule, then TVM's default.

    `weight_dtype="bfloat16"`: the constant weights of the matmuls are rounded to bf16 first
    (`weights.bf16_weights`, after folding transposed weights into constants).

    NOTE: `tvm.compile`'s default pipeline for a CPU target neither fuses nor schedules anything:
    every Relax op becomes its own scalar, single-threaded loop nest. Here elementwise tails fuse
    into the matmul before them (bias, residual add, SiLU gating), and `schedules.cpu_dense` gives
    every dense layer a parallel, register-tiled, vectorized schedule. The default pipeline's own
    dispatch and legalization then find nothing left to do.
    """
    from tvm.relax import backend

    @tvm.transform.module_pass(opt_level=0, name="pgen.ScheduleDense")
    def schedule_dense(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        constants = constant_arguments(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and func.attrs.get(weights.ACT_QUANT):
                mod[gvar] = cpu_dense.schedule_act_quant(func)
            elif isinstance(func, tvm.tirx.PrimFunc):
                scheduled = cpu_dense.apply(func, target.info, constant_params=constants.get(gvar.name_hint, frozenset()))
                if scheduled is not None:
                    mod[gvar] = scheduled
        return mod

    @tvm.transform.module_pass(opt_level=0, name="pgen.ElementAlignedParams")
    def element_aligned(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[gvar] = element_aligned_params(func)
        return mod

    rounding = {"bfloat16": [relax.transform.FoldConstant(), weights.bf16_weights()],
                "int8": [relax.transform.FoldConstant(), weights.int8_weights()]}.get(weight_dtype, [])
    # Sampling and sort/scan ops dispatch to their library kernels before "zero" legalizes them;
    # "zero" then finds every op legalized already (`fast_legalize`) and annotates, folds and fuses.
    return tvm.transform.Sequential([checked_take(), *rounding, backend.DispatchSampling(), backend.DispatchSortScan(),
                                     fast_legalize(), relax.get_pipeline("zero"), schedule_dense,
                                     # The weights' packing runs here, once: packed constants replace them.
                                     split_weight_packing(), relax.transform.FoldConstant(),
                                     relax.get_pipeline("default"),
                                     element_aligned], name="pgen.model_pipeline")


def fast_legalize() -> tvm.transform.Pass:
    """Relax's LegalizeOps, with float32 sigmoid and tanh computed inline (`schedules.fast_math`).

    NOTE: TOPI's sigmoid and tanh lower to one scalar libm call per element, which LLVM cannot
    vectorize; in the SiLU epilogue of a gate projection that was 4% of a batch-32 decode step of
    Qwen2.5-0.5B's shape (perf). The inline forms vectorize with the epilogue and are as accurate
    as libm's to within 1e-7 relative (tests/models/test_fast_math.py). Tanh is GPT-2's gelu_new
    and Gemma-2's logit soft-cap.
    """

    def inline(name: str, fn):
        def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
            if getattr(call.ty, "dtype", None) != "float32":
                return call  # "zero"'s own legalization takes it
            return bb.call_te(lambda x: te.compute(x.shape, lambda *i: fn(x(*i)), name=name),
                              call.args[0], primfunc_name_hint=name)
        return legalize

    return relax.transform.LegalizeOps({"relax.sigmoid": inline("sigmoid", fast_sigmoid),
                                        "relax.tanh": inline("tanh", fast_tanh)})


def split_weight_packing() -> tvm.transform.Pass:
    """Relax's SplitLayoutRewritePreproc on the functions that pack a weight (`cpu_dense`).

    NOTE: TVM 0.27's pass visits every PrimFunc and fails ("There should be at least a block in
    the subtree") on one without blocks, as pgen's attention kernels are; it runs here on a module
    of the Relax functions and the packing PrimFuncs only, and the others are put back after.
    """
    split = relax.transform.SplitLayoutRewritePreproc()

    def packs(func) -> bool:
        return func.attrs is not None and bool(func.attrs.get(cpu_dense.PACKS_WEIGHT, False))

    @tvm.transform.module_pass(opt_level=0, name="pgen.SplitWeightPacking")
    def split_packing(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kept = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and not packs(f)}
        if len(kept) == sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values()):
            return mod
        out = split(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in kept}, attrs=mod.attrs))
        for gv, f in kept.items():
            out[gv] = f
        return out

    return split_packing


def constant_arguments(mod: tvm.IRModule) -> dict[str, frozenset[int]]:
    """Per PrimFunc (by name), the positions of the arguments that every `call_tir` of it passes a
    constant: the weights a dense layer may repack at compile time."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: dict[str, frozenset[int]] = {}

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            if call.op.same_as(call_tir):
                name = call.args[0].name_hint
                args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
                mine = frozenset(n for n, a in enumerate(args) if isinstance(a, tvm.ir.expr.GenericConst))
                found[name] = found[name] & mine if name in found else mine

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Calls().visit_expr(func)
    return found


def checked_take() -> tvm.transform.Pass:
    """Every `take` (ONNX Gather) clamps its indices instead of trusting them.

    NOTE: TVM's ONNX frontend maps Gather to `take(mode="fast")`, which reads out of bounds for an
    index past the table: a token id past the vocabulary, or a position past the rotary table
    (a sequence longer than the export's max positions). The frontend already maps negative
    indices; "clip" makes any other index safe by construction, at one min/max per gathered row.
    The runtime refuses such inputs with a typed error before they reach the model.
    """
    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class _Checked(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(take) and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
            return call

    return _each_relax_function("pgen.CheckedTake", _Checked)


def element_aligned_params(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """`func` with every buffer parameter assumed aligned to one element, not to 64 bytes.

    NOTE: TVM declares the buffers of the functions it legalizes 64-byte aligned, and LLVM then
    emits aligned vector loads and stores (vmovaps/vmovdqa), which fault on a tensor that is only
    element-aligned: a numpy array of a few tokens (16-byte aligned) passed as input_ids crashed
    the model at its first batched step on AVX2 hosts. The VM passes its inputs through without
    checking alignment, so the compiled model must accept what any DLPack tensor guarantees, as
    pgen's kernels do (`schedules.base.elem_bytes`). Unaligned vector loads of aligned data cost
    nothing on the x86 cores pgen targets.
    """
    import tvm_ffi
    from tvm.tirx.buffer import BufferType

    swaps = []
    for p in func.params:
        elem = max(1, p.dtype.bits * p.dtype.lanes // 8) if isinstance(p.ty, BufferType) else 0
        if elem and p.data_alignment > elem:
            swaps.append((p, tvm.tirx.decl_buffer(p.shape, p.dtype, p.name, data=p.data, strides=p.strides,
                                                  elem_offset=p.elem_offset, scope=p.scope(),
                                                  data_alignment=elem, offset_factor=p.offset_factor)))
    if not swaps:
        return func

    def swap(buffer: tvm.tirx.Buffer) -> tvm.tirx.Buffer:
        return next((new for old, new in swaps if buffer.same_as(old)), buffer)

    return tvm_ffi.structural_map(func, [(tvm.tirx.Buffer, lambda v: swap(v) if isinstance(v.ty, BufferType) else v)])
