// The dispatcher's fused operations (kernels/): top-k selection, capacity
// assignment, permute and unpermute + gate-weighted combine, with autograd.
//
// On CUDA tensors they launch the kernels of kernels/dispatch_kernels.cu; on CPU
// tensors they run the kernels' own element functions (kernels/dispatch_ops.h) in
// host loops. KernelDispatcher (model/dispatcher.h) is their user; on CPUs it is
// how the test suite checks the kernels' logic against the PyTorch-op backend.
#pragma once
#include <ATen/ATen.h>

#include <utility>

namespace moeprune {

// Whether this binary contains the CUDA kernels (built with the CUDA path).
bool cuda_kernels_built();
// Whether they have code for CUDA device `device` (when not, one warning: the
// dispatcher falls back to torch ops there).
bool cuda_kernels_runnable(int device);

// probs [..., E] float32 -> {expert [..., k] int64, gate [..., k] float32}; ties go
// to the lower expert index. Not differentiable (take gates from probs with gather).
std::pair<at::Tensor, at::Tensor> fused_topk(const at::Tensor& probs, int k);
// top_expert [G, S, K] int64, order [G, S] int64, token_valid [G, S] bool (optional)
// -> {position int64, keep bool}, the semantics of assign_slots() in router.h.
std::pair<at::Tensor, at::Tensor> fused_assign_slots(const at::Tensor& top_expert, const at::Tensor& order,
                                                     int num_experts, int64_t capacity,
                                                     const at::Tensor& token_valid = {});

// Raw operations (no autograd). x, y: [rows, H] float32 or bfloat16, contiguous.
at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& index, const at::Tensor& scale = {});
at::Tensor combine_rows(const at::Tensor& y, const at::Tensor& row_of, const at::Tensor& weight = {});

// slot [A] int64, distinct values in [0, N*K) -> row_of [N, K] int64 with
// row_of.view(-1)[slot[a]] = a and -1 elsewhere. With slot = n*K + j of the kept
// choices in send order, row_of[n, j] is the send row of choice j of token n.
at::Tensor inverse_rows(const at::Tensor& slot, int64_t N, int64_t K);

// Differentiable permute: out[a] = x[index[a]]. row_of is index's inverse over x's
// rows ([rows of x, K]); the backward sums the gradient rows of each source row.
at::Tensor permute_rows_autograd(const at::Tensor& x, const at::Tensor& index, const at::Tensor& row_of);
// Differentiable unpermute + combine: out[n] = sum_a:token[a]=n gate[a] * y[a], with
// row_of [N, K] the rows of each token. Gradients flow to y and gate.
at::Tensor combine_autograd(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& token,
                            const at::Tensor& row_of);

}  // namespace moeprune
