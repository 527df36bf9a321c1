// Launchers of the dispatcher's CUDA kernels (dispatch_kernels.cu). Plain pointers
// and an opaque stream so that callers need neither CUDA nor torch headers; the
// torch-facing wrappers are in src/model/fused_dispatch.cpp. Every launcher runs
// asynchronously on `stream` (a cudaStream_t) and throws std::runtime_error naming
// the kernel when the launch fails.
#pragma once
#include <cstdint>

#include "kernels/dispatch_ops.h"

namespace moeprune::kernels {

enum class DType { f32, bf16 };

// probs [N, E] float -> expert [N, K] int64, gate [N, K] float. K <= kMaxTopK.
void launch_topk(const float* probs, int64_t N, int E, int K, int64_t* expert, float* gate, void* stream);
// Both passes of the capacity assignment (count, then assign) for G groups.
void launch_assign_slots(const SlotArgs& args, int64_t G, void* stream);
// out[a, :] = x[index[a], :] * (scale ? scale[a] : 1); x [*, H], out [A, H].
void launch_permute(DType dt, const void* x, const int64_t* index, const float* scale, void* out, int64_t A,
                    int64_t H, void* stream);
// out[n, :] = sum_j weight[n, j] * y[row_of[n, j], :]; out [N, H].
void launch_combine(DType dt, const void* y, const int64_t* row_of, const float* weight, void* out, int64_t N,
                    int64_t K, int64_t H, void* stream);

// Whether this binary holds code for `device` (its compute capability is among
// CMAKE_CUDA_ARCHITECTURES): false with the CUDA error in *why otherwise.
bool kernels_runnable(int device, const char** why);

// How many pieces the capacity assignment cuts a group's choice sequence into.
inline int64_t slot_chunks(int64_t S, int64_t K) {
  const int64_t c = (S * K + 63) / 64;
  return c < 1 ? 1 : (c > 64 ? 64 : c);
}

}  // namespace moeprune::kernels
