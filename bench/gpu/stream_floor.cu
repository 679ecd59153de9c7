// What reading a decode step's bytes costs under bench-decode's `step` timing, with no attention at all: a
// CUDA graph queued behind a 256 MiB memset (cold, dirty L2; the host's launch hidden), CUDA events around
// the graph, median of 41; and the same launches queued directly behind the memset (`eager`). Cases: an empty kernel
// (the timing's own overhead), and a kernel whose CTAs each read one contiguous slice of N bytes (16-byte loads, 8 in
// flight per thread, summed so nothing is optimised away), optionally with a second one-CTA kernel behind it
// (programmatic dependent launch) that reads the CTAs' partial sums -- the shape of a split decode plus its merge; each
// with plain loads and with loads that carry an L2::evict_first cache policy (as the decode kernel's). The byte counts
// are the visible K/V of bench-decode's B=1 cases (T=16K: 2,945 rows; T=128K: 17,281 rows; 8 KV heads, D=128, bf16).
// Also bulk copies (TMA, cp.async.bulk into an smem ring of `stages` pieces of `chunk` bytes, one thread
// issuing, mbarrier completion, evict_first), which have the fewest instructions per byte.
// Needs sm_90+ (programmatic dependent launch); bench/gpu/decode.sh builds and runs it:
//   nvcc -O3 -std=c++17 -arch=native bench/gpu/stream_floor.cu -o stream_floor
//   ./stream_floor
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

struct Args {
  const uint4* src;
  long long slice16;  // 16-byte words per CTA
  float* part;        // one float per CTA
  float* out;
  int ctas;
  int evict_first;  // 1: loads carry an L2::evict_first cache policy (streamed bytes displace each other first)
  int stages = 0, chunk = 0;  // bulk_kernel: smem ring of `stages` pieces of `chunk` bytes
};

__device__ __forceinline__ uint4 load16(const uint4* p, int evict_first, uint64_t pol) {
  if (!evict_first) return __ldg(p);
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
  return v;
}

__global__ void empty_kernel(Args a) {
  if (threadIdx.x == 1u << 20) a.out[0] = 0.f;  // never true; keeps the kernel's argument live
}

// The CTA's sum (of 128 threads' s) into a.part[blockIdx.x]; then the merge kernel may launch.
__device__ __forceinline__ void finish_cta(const Args& a, float s) {
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float red[4];
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) a.part[blockIdx.x] = red[0] + red[1] + red[2] + red[3];
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// CTA b reads words [b * slice16, (b + 1) * slice16), 8 loads in flight per thread.
__global__ void __launch_bounds__(128) stream_kernel(Args a) {
  const uint4* p = a.src + blockIdx.x * a.slice16;
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  float s = 0.f;
  for (long long i = threadIdx.x; i < a.slice16; i += 128 * 8) {
    uint4 v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const long long k = i + j * 128;
      v[j] = k < a.slice16 ? load16(p + k, a.evict_first, pol) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) s += __uint_as_float((v[j].x ^ v[j].y ^ v[j].z ^ v[j].w) & 0x007fffffu);
  }
  finish_cta(a, s);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// CTA b reads the same slice as stream_kernel's CTA b, by bulk copies: thread 0 keeps `stages` pieces of
// `chunk` bytes in flight (evict_first), every thread sums a sixteenth of each piece once it has landed.
__global__ void __launch_bounds__(128) bulk_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) uint64_t full[16];
  const long long bytes = a.slice16 * 16;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(a.src + blockIdx.x * a.slice16);
  const int n = int((bytes + a.chunk - 1) / a.chunk);
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  if (threadIdx.x == 0) {
    for (int s = 0; s < a.stages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&full[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int t) {
    const long long off = (long long)t * a.chunk;
    const uint32_t len = uint32_t(bytes - off < a.chunk ? bytes - off : a.chunk), mb = smem_u32(&full[t % a.stages]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mb), "r"(len) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
            "r"(smem_u32(ring + (t % a.stages) * a.chunk)),
        "l"(p + off), "r"(len), "r"(mb), "l"(pol)
        : "memory");
  };
  if (threadIdx.x == 0)
    for (int t = 0; t < n && t < a.stages; ++t) issue(t);
  float s = 0.f;
  for (int t = 0; t < n; ++t) {
    const uint32_t mb = smem_u32(&full[t % a.stages]), parity = (t / a.stages) & 1;
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                   : "=r"(done)
                   : "r"(mb), "r"(parity)
                   : "memory");
    const uint4* q = reinterpret_cast<const uint4*>(ring + (t % a.stages) * a.chunk);
    for (int i = threadIdx.x; i < a.chunk / 16; i += 128 * 16) {
      const uint4 v = q[i];
      s += __uint_as_float((v.x ^ v.y ^ v.z ^ v.w) & 0x007fffffu);
    }
    __syncthreads();  // the piece is consumed: thread 0 may refill its stage
    if (threadIdx.x == 0 && t + a.stages < n) issue(t + a.stages);
  }
  finish_cta(a, s);
}

// One CTA: the partial sums of stream_kernel, after it has finished (griddepcontrol.wait).
__global__ void merge_kernel(Args a) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  float s = 0.f;
  for (int i = threadIdx.x; i < a.ctas; i += blockDim.x) s += a.part[i];
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x == 0) a.out[0] = s;
}

void launch(void (*k)(Args), int grid, int threads, bool pdl, const Args& a, cudaStream_t st, int smem = 0) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(grid));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = size_t(smem);
  cfg.stream = st;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  CK(cudaLaunchKernelEx(&cfg, k, a));
}

// Median us of `enqueue` behind a memset of `flush`: captured in a CUDA graph and launched (as bench-decode's
// step column), and queued directly (eager, as triton.testing.do_bench calls a function).
struct Times {
  double graph, eager;
};
template <class F>
Times step_us(cudaStream_t st, F&& enqueue, void* flush, size_t flush_bytes) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  enqueue();
  CK(cudaStreamEndCapture(st, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaGraphLaunch(ge, st));
  CK(cudaStreamSynchronize(st));
  auto median = [&](auto&& run) {
    std::vector<float> t;
    for (int r = 0; r < 41; ++r) {
      CK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, st));
      CK(cudaEventRecord(e0, st));
      run();
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms = 0.f;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      t.push_back(ms * 1000.f);
    }
    std::sort(t.begin(), t.end());
    return double(t[t.size() / 2]);
  };
  const Times res{median([&] { CK(cudaGraphLaunch(ge, st)); }), median(enqueue)};
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return res;
}

// One line of the table: step us (graph), eager us, GB/s at the step time.
void print_row(const char* name, Times t, double bytes) {
  if (bytes > 0) std::printf("%-54s %10.2f %10.2f %10.1f\n", name, t.graph, t.eager, bytes / (t.graph * 1e-6) / 1e9);
  else std::printf("%-54s %10.2f %10.2f %10s\n", name, t.graph, t.eager, "-");
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const size_t flush_bytes = size_t(256) << 20, src_bytes = size_t(80) << 20;
  void *flush, *src;
  float *part, *out;
  CK(cudaMalloc(&flush, flush_bytes));
  CK(cudaMalloc(&src, src_bytes));
  CK(cudaMemset(src, 1, src_bytes));
  CK(cudaMalloc(&part, 4096 * sizeof(float)));
  CK(cudaMalloc(&out, sizeof(float)));
  std::printf(
      "device: %s (%d SMs); behind a 256 MiB memset, median of 41: step us = the work as a CUDA graph,\n"
      "eager us = its launches queued directly\n",
      prop.name, prop.multiProcessorCount);
  std::printf("%-54s %10s %10s %10s\n", "case", "step us", "eager us", "GB/s");
  Args a{static_cast<const uint4*>(src), 0, part, out, 1, 0};
  print_row("empty kernel",
            step_us(
                st, [&] { launch(empty_kernel, 1, 128, false, a, st); }, flush, flush_bytes),
            0);
  const struct {
    const char* name;
    double bytes;
  } sizes[] = {{"T=16K (2,945 rows)", 2945.0 * 8 * 128 * 2 * 2}, {"T=128K (17,281 rows)", 17281.0 * 8 * 128 * 2 * 2}};
  for (const auto& sz : sizes)
    for (int ef : {0, 1})
      for (int ctas : {376, 1056})
        for (bool merge : {false, true}) {
          Args b = a;
          b.ctas = ctas;
          b.evict_first = ef;
          b.slice16 = (long long)(sz.bytes / ctas / 16);
          const Times us = step_us(
              st,
              [&] {
                launch(stream_kernel, ctas, 128, false, b, st);
                if (merge) launch(merge_kernel, 1, 128, true, b, st);
              },
              flush, flush_bytes);
          char name[96];
          std::snprintf(name, sizeof name, "%s, %d CTAs%s%s", sz.name, ctas, merge ? " + merge" : "",
                        ef ? ", evict_first" : "");
          print_row(name, us, double(b.slice16) * 16 * ctas);
        }
  CK(cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 192 * 1024));
  const struct {
    int ctas, stages, chunk;
  } bulk[] = {{132, 6, 32768}, {264, 6, 16384}, {396, 4, 16384}, {528, 3, 16384}};
  for (const auto& sz : sizes)
    for (const auto& v : bulk)
      for (bool merge : {false, true}) {
        Args b = a;
        b.ctas = v.ctas, b.stages = v.stages, b.chunk = v.chunk, b.evict_first = 1;
        b.slice16 = (long long)(sz.bytes / v.ctas / 16);
        const Times us = step_us(
            st,
            [&] {
              launch(bulk_kernel, v.ctas, 128, false, b, st, v.stages * v.chunk);
              if (merge) launch(merge_kernel, 1, 128, true, b, st);
            },
            flush, flush_bytes);
        char name[96];
        std::snprintf(name, sizeof name, "%s, bulk %d CTAs x %d x %d KB%s", sz.name, v.ctas, v.stages, v.chunk / 1024,
                      merge ? " + merge" : "");
        print_row(name, us, double(b.slice16) * 16 * v.ctas);
      }
  return 0;
}
