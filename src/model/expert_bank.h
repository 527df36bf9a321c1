// The experts of one MoE layer that live on this rank, stored stacked so that
// pruning and migration are index operations: expert i (local order) has
// w1[i]: [hidden, mlp], b1[i]: [mlp], w2[i]: [mlp, hidden], b2[i]: [hidden].
// Computed by one of three strategies (runtime.expert_gemm): one GEMM pair per
// local expert over its contiguous rows (loop, at::addmm), one grouped GEMM per
// layer side over all local experts (grouped, at::_grouped_mm: CUTLASS on Hopper
// GPUs, a composite on CPUs), or one batched product per side over the experts
// padded to the largest count (batched, at::baddbmm: few calls for small experts).
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <vector>

#include "core/choices.h"

namespace moeprune {

// Seed of expert `expert_id` in MoE layer `layer`: experts are initialised from
// their own generator so that their weights do not depend on placement.
uint64_t expert_seed(uint64_t seed, int layer, int expert_id);


class ExpertBankImpl : public torch::nn::Module {
 public:
  // expert_ids: the layer's expert ids this rank holds, ascending.
  ExpertBankImpl(int hidden, int mlp_dim, std::vector<int> expert_ids, int layer, uint64_t seed,
                 ExpertGemm gemm = ExpertGemm::Auto);
  // x: [sum(counts), hidden] rows grouped by local expert; returns [sum(counts), hidden].
  at::Tensor forward(const at::Tensor& x, const std::vector<int64_t>& counts);
  ExpertGemm gemm() const { return gemm_; }
  void set_gemm(ExpertGemm g) { gemm_ = g; }

  const std::vector<int>& expert_ids() const { return expert_ids_; }
  int num_local() const { return static_cast<int>(expert_ids_.size()); }

  at::Tensor w1, b1, w2, b2;

 private:
  at::Tensor forward_loop(const at::Tensor& x, const std::vector<int64_t>& counts);
  at::Tensor forward_grouped(const at::Tensor& x, const std::vector<int64_t>& counts);
  at::Tensor forward_batched(const at::Tensor& x, const std::vector<int64_t>& counts);

  std::vector<int> expert_ids_;
  ExpertGemm gemm_;
};
TORCH_MODULE(ExpertBank);

}  // namespace moeprune
