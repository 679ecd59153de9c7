// Portability macros shared by host and device code.
#pragma once

#if defined(__CUDACC__)
#define KSA_HD __host__ __device__ __forceinline__
#else
#define KSA_HD inline
#endif
