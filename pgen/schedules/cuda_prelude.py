"""CUDA_PRELUDE: device code the CUDA kernels call, which pgen.cuda prepends to every CUDA build."""

from __future__ import annotations

# NOTE: WMMA does not specify which matrix element each lane's accumulator entry x[k] holds. On
# sm_80 and later the m16n16k16 fp32 accumulator is two m16n8 halves of the mma.sync layout that
# the PTX ISA documents: lane l holds rows l/4 (k = 0, 1, 4, 5) and l/4 + 8 (k = 2, 3, 6, 7). The
# GPU check verifies kernels built on it; CudaExtendMma offers `mma_o` 1 (its only caller) from
# sm_80 up.
CUDA_PRELUDE = """
template <typename Frag>
__device__ __forceinline__ void pgen_acc_scale_rows(Frag* frags, int i, const float* row_factor) {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  const float lo = row_factor[lane >> 2], hi = row_factor[(lane >> 2) + 8];
#pragma unroll
  for (int k = 0; k < frags[i].num_elements; ++k) frags[i].x[k] *= ((k >> 1) & 1) ? hi : lo;
}
"""
