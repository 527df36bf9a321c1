// CUDA kernels of the dispatcher. The per-element work is in dispatch_ops.h, shared
// with the host path that the CPU tests run; this file only maps it onto grids and
// adds 16-byte vector loads for the bandwidth-bound permute and combine.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels/dispatch_kernels.h"

namespace moeprune::kernels {
namespace {

constexpr int kThreads = 256;

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("moeprune CUDA kernel ") + what + ": " + cudaGetErrorString(err));
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

__global__ void topk_kernel(const float* probs, int64_t N, int E, int K, int64_t* expert, float* gate) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) topk_row(probs + n * E, E, K, expert + n * K, gate + n * K);
}

__global__ void slot_count_kernel(SlotArgs a, int64_t total) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t g, e, c;
  slot_thread(a, t, g, e, c);
  slot_count(a, g, e, c);
}

__global__ void slot_assign_kernel(SlotArgs a, int64_t total) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t g, e, c;
  slot_thread(a, t, g, e, c);
  slot_assign(a, g, e, c);
}

// One thread per output element (scalar fallback for odd widths or alignment).
template <typename T>
__global__ void permute_scalar_kernel(const T* x, const int64_t* index, const float* scale, T* out, int64_t A,
                                      int64_t H) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < A * H) permute_span(x, index, scale, out, H, t / H, t % H, 1);
}

template <typename T>
__global__ void combine_scalar_kernel(const T* y, const int64_t* row_of, const float* weight, T* out, int64_t N,
                                      int64_t K, int64_t H) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float acc;
  if (t < N * H) combine_span(y, row_of, weight, out, &acc, K, H, t / H, t % H, 1);
}

// 16 bytes per thread: V elements of T. Same arithmetic as the element functions.
template <typename T>
struct Vec {
  static constexpr int V = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[V];
  };
};

template <typename T>
__global__ void permute_vec_kernel(const T* x, const int64_t* index, const float* scale, T* out, int64_t A,
                                   int64_t H) {
  constexpr int V = Vec<T>::V;
  const int64_t per_row = H / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= A * per_row) return;
  const int64_t a = t / per_row, c = t % per_row;
  Vec<T> in;
  in.raw = __ldg(reinterpret_cast<const uint4*>(x + index[a] * H) + c);
  if (scale) {
    const float s = scale[a];
#pragma unroll
    for (int i = 0; i < V; ++i) in.v[i] = from_float<T>(to_float(in.v[i]) * s);
  }
  reinterpret_cast<uint4*>(out + a * H)[c] = in.raw;
}

template <typename T>
__global__ void combine_vec_kernel(const T* y, const int64_t* row_of, const float* weight, T* out, int64_t N,
                                   int64_t K, int64_t H) {
  constexpr int V = Vec<T>::V;
  const int64_t per_row = H / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= N * per_row) return;
  const int64_t n = t / per_row, c = t % per_row;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t r = row_of[n * K + j];
    if (r < 0) continue;
    Vec<T> in;
    in.raw = __ldg(reinterpret_cast<const uint4*>(y + r * H) + c);
    const float w = weight ? weight[n * K + j] : 1.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += weight ? w * to_float(in.v[i]) : to_float(in.v[i]);
  }
  Vec<T> o;
#pragma unroll
  for (int i = 0; i < V; ++i) o.v[i] = from_float<T>(acc[i]);
  reinterpret_cast<uint4*>(out + n * H)[c] = o.raw;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
void permute_t(const void* x, const int64_t* index, const float* scale, void* out, int64_t A, int64_t H,
               cudaStream_t s) {
  if (A == 0 || H == 0) return;
  const T* xt = static_cast<const T*>(x);
  T* ot = static_cast<T*>(out);
  constexpr int V = Vec<T>::V;
  if (H % V == 0 && aligned16(x) && aligned16(out)) {
    permute_vec_kernel<T><<<blocks_for(A * (H / V)), kThreads, 0, s>>>(xt, index, scale, ot, A, H);
  } else {
    permute_scalar_kernel<T><<<blocks_for(A * H), kThreads, 0, s>>>(xt, index, scale, ot, A, H);
  }
  check_launch("permute");
}

template <typename T>
void combine_t(const void* y, const int64_t* row_of, const float* weight, void* out, int64_t N, int64_t K,
               int64_t H, cudaStream_t s) {
  if (N == 0 || H == 0) return;
  const T* yt = static_cast<const T*>(y);
  T* ot = static_cast<T*>(out);
  constexpr int V = Vec<T>::V;
  if (H % V == 0 && aligned16(y) && aligned16(out)) {
    combine_vec_kernel<T><<<blocks_for(N * (H / V)), kThreads, 0, s>>>(yt, row_of, weight, ot, N, K, H);
  } else {
    combine_scalar_kernel<T><<<blocks_for(N * H), kThreads, 0, s>>>(yt, row_of, weight, ot, N, K, H);
  }
  check_launch("combine");
}

}  // namespace

bool kernels_runnable(int device, const char** why) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = device;
  cudaError_t err = cudaSetDevice(device);
  cudaFuncAttributes attr;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, topk_kernel);
  cudaSetDevice(prev);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the error state so that later launches do not report it
    if (why) *why = cudaGetErrorString(err);
    return false;
  }
  return true;
}

void launch_topk(const float* probs, int64_t N, int E, int K, int64_t* expert, float* gate, void* stream) {
  if (K < 1 || K > kMaxTopK || K > E)
    throw std::invalid_argument("moeprune CUDA kernel topk: k=" + std::to_string(K) + " outside [1, min(" +
                                std::to_string(kMaxTopK) + ", E=" + std::to_string(E) + ")]");
  if (N == 0) return;
  topk_kernel<<<blocks_for(N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(probs, N, E, K, expert, gate);
  check_launch("topk");
}

void launch_assign_slots(const SlotArgs& args, int64_t G, void* stream) {
  const int64_t total = G * args.E * args.chunks;
  if (total == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  slot_count_kernel<<<blocks_for(total), kThreads, 0, s>>>(args, total);
  check_launch("slot_count");
  slot_assign_kernel<<<blocks_for(total), kThreads, 0, s>>>(args, total);
  check_launch("slot_assign");
}

void launch_permute(DType dt, const void* x, const int64_t* index, const float* scale, void* out, int64_t A,
                    int64_t H, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dt == DType::f32) permute_t<float>(x, index, scale, out, A, H, s);
  else permute_t<bf16>(x, index, scale, out, A, H, s);
}

void launch_combine(DType dt, const void* y, const int64_t* row_of, const float* weight, void* out, int64_t N,
                    int64_t K, int64_t H, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dt == DType::f32) combine_t<float>(y, row_of, weight, out, N, K, H, s);
  else combine_t<bf16>(y, row_of, weight, out, N, K, H, s);
}

}  // namespace moeprune::kernels
