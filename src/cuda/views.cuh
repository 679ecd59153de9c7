// The one strided view the device kernels take for q, k, v, out and their gradients (forward, backward and
// decode): a base pointer and element strides (batch, row, head), a head's D elements contiguous. Made from
// the public TensorView (ksa/attention.hpp) by view_of; kernels take it by value inside their argument struct.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ksa/attention.hpp"

namespace ksa::cuda::detail {

struct View {
  void* p = nullptr;
  int64_t b = 0, r = 0, h = 0;  // strides in elements
};

// Element 0 of head `head` of row `row` of batch entry `batch` (the view by value: kernels hold it in their
// argument structs, which live in parameter space).
template <class T>
__host__ __device__ __forceinline__ T* at(View v, int64_t batch, int64_t row, int64_t head) {
  return static_cast<T*>(v.p) + batch * v.b + row * v.r + head * v.h;
}

inline View view_of(const TensorView& t) { return View{t.data, t.batch_stride, t.row_stride, t.head_stride}; }

// The same view starting `rows` rows further on (T: the element type).
template <class T>
__host__ __device__ __forceinline__ View rows_on(const View& v, int64_t rows) {
  return View{const_cast<void*>(static_cast<const void*>(static_cast<const T*>(v.p) + rows * v.r)), v.b, v.r, v.h};
}

}  // namespace ksa::cuda::detail
