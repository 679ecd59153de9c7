// The tensor memory accelerator (TMA, sm_90) for the sm_90a kernels (include only from *_sm90a.cu): mbarriers,
// tiled tensor copies global -> shared with byte-count completion, and the host side that encodes a tensor
// map (cuTensorMapEncodeTiled, reached through the runtime's driver entry point: no link against libcuda).
//
// A tensor map describes up to 5 dimensions of a global tensor (sizes, byte strides) and the box one copy
// moves; rows outside the sizes are zero-filled in shared memory and still count towards the copy's bytes.
// With CU_TENSOR_MAP_SWIZZLE_128B the box's first dimension is 128 bytes (64 16-bit elements) and the copy
// writes its rows with the 128-byte swizzle of the shared address (chunk c of the row at address a lands at
// chunk c ^ ((a >> 7) & 7)), i.e. the layout of wgmma.cuh's sw128 when the destination's column block starts
// on a 1024-byte boundary.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>


namespace ksa::cuda::dev {

// ------------------------------------------------------------------------------------------- mbarriers
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialised mbarriers visible to the async proxy (TMA completes on them); __syncthreads after.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also announces `bytes` more to come from async copies completing on this barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// The barrier's arrival for this thread happens when all its cp.async issued so far have landed (.noinc: it
// counts as one of the arrivals the barrier was initialised with).
__device__ __forceinline__ void mbar_cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ------------------------------------------------------------------------------------------ TMA copies
// Box at coordinates (c0..c4) of the 5-D map into shared memory at dst, completing on mbarrier bar.
__device__ __forceinline__ void tma_load5(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, int c4,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load4(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

}  // namespace ksa::cuda::dev

namespace ksa::cuda::detail {

// A tiled tensor map of 16-bit elements (the copies move bits: bf16 and f16 alike), 128B-swizzled boxes:
// `rank` dimensions, dims[0] contiguous, strides[i] = the byte stride of dimension i + 1, box[i] elements per
// copy along dimension i (box[0] * 2 <= 128 bytes). False where the driver does not take the map (a stride
// it rejects, no driver entry point): the caller then copies another way.
inline bool encode_map16(CUtensorMap& map, const void* base, int rank, const uint64_t* dims, const uint64_t* strides,
                         const uint32_t* box) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Encode encode = []() -> Encode {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (!encode) return false;
  const cuuint32_t estr[5] = {1, 1, 1, 1, 1};
  return encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, cuuint32_t(rank), const_cast<void*>(base), dims, strides, box,
                estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace ksa::cuda::detail
