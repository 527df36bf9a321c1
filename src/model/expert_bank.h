// The experts of one MoE layer that live on this rank, stored stacked so that
// pruning and migration are index operations: expert i (local order) has
// w1[i]: [hidden, mlp], b1[i]: [mlp], w2[i]: [mlp, hidden], b2[i]: [hidden].
// Computed by one of three strategies (runtime.expert_gemm): one GEMM pair per
// local expert over its contiguous rows (loop, at::addmm; one autograd node for all
// experts whose backward writes the stacked weight gradients in place), one grouped GEMM per
// layer side over all local experts (grouped, at::_grouped_mm: CUTLASS on Hopper
// GPUs, a composite on CPUs), or one batched product per side over the experts
// padded to a row count that does not depend on the placement (batched, at::bmm:
// two products per layer for small experts).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "core/choices.h"

namespace moeprune {

// Seed of expert `expert_id` in MoE layer `layer`: experts are initialised from
// their own generator so that their weights do not depend on placement.
uint64_t expert_seed(uint64_t seed, int layer, int expert_id);


// Lets the exchange of rows overlap the experts of the loop strategy
// (model/direct_exchange.h, runtime.dispatch_chunks), expert by expert. Forward:
// rows_ready(i) before local expert i reads its rows, outputs_done(i, y) once its
// output rows y are written. Backward: output_grad(i, g) returns the gradient of
// expert i's outputs once it is there (g: the rows autograd passed), and
// input_grad_done(i, dx) follows once the gradient of its input rows is written.
// Held by the autograd graph until backward (an intrusive_ptr).
class ExpertHooks : public torch::CustomClassHolder {
 public:
  virtual ~ExpertHooks() = default;
  virtual void rows_ready(int expert) = 0;
  virtual void outputs_done(int expert, const at::Tensor& y) = 0;
  virtual at::Tensor output_grad(int expert, const at::Tensor& g) = 0;
  virtual void input_grad_done(int expert, const at::Tensor& dx) = 0;
};
using ExpertHooksPtr = c10::intrusive_ptr<ExpertHooks>;

// Allocates the [rows, cols] output of the experts where the combine wants it
// (TokenDispatcher::output_alloc: the node memory of the CPU direct exchange, which
// the other ranks read in place). Empty: a plain tensor.
using RowsAlloc = std::function<at::Tensor(int64_t rows, int64_t cols, const at::TensorOptions& options)>;

class ExpertBankImpl : public torch::nn::Module {
 public:
  // expert_ids: the layer's expert ids this rank holds, ascending.
  ExpertBankImpl(int hidden, int mlp_dim, std::vector<int> expert_ids, int layer, uint64_t seed,
                 ExpertGemm gemm = ExpertGemm::Auto);
  // x: [sum(counts), hidden] rows grouped by local expert; returns [sum(counts), hidden].
  // rows_bound: the most rows any expert of the layer got in this call over the ranks
  // of the expert-parallel group (the same on every rank, and in one process); 0 =
  // unknown. The batched product pads every expert to it, so that an expert's bits do
  // not depend on which experts share its rank; without it, to the largest local count.
  // hooks: only with the loop strategy (resolved_gemm(x) == Loop). alloc: where the
  // loop strategy writes its output (the others return their products' tensors).
  at::Tensor forward(const at::Tensor& x, const std::vector<int64_t>& counts, int64_t rows_bound = 0,
                     const ExpertHooksPtr& hooks = {}, const RowsAlloc& alloc = {});
  // The strategy `auto` resolves to for input x: grouped on GPUs; on CPUs batched for
  // experts of hidden x mlp < 128 x 512 computing in bf16, a GEMM pair per expert else.
  ExpertGemm resolved_gemm(const at::Tensor& x) const;
  ExpertGemm gemm() const { return gemm_; }
  void set_gemm(ExpertGemm g) { gemm_ = g; }

  const std::vector<int>& expert_ids() const { return expert_ids_; }
  int num_local() const { return static_cast<int>(expert_ids_.size()); }

  at::Tensor w1, b1, w2, b2;

 private:
  at::Tensor forward_loop(const at::Tensor& x, const std::vector<int64_t>& counts, const ExpertHooksPtr& hooks,
                          const RowsAlloc& alloc);
  at::Tensor forward_grouped(const at::Tensor& x, const std::vector<int64_t>& counts);
  at::Tensor forward_batched(const at::Tensor& x, const std::vector<int64_t>& counts, int64_t rows_bound);

  std::vector<int> expert_ids_;
  ExpertGemm gemm_;
};
TORCH_MODULE(ExpertBank);

}  // namespace moeprune
