// The experts of one MoE layer that live on this rank, stored stacked so that
// pruning and migration are index operations: expert i (local order) has
// w1[i]: [hidden, mlp], b1[i]: [mlp], w2[i]: [mlp, hidden], b2[i]: [hidden].
// Computed over each expert's contiguous rows, never as masked full-size
// products: either one GEMM pair per local expert ("loop", at::addmm) or one
// grouped GEMM per layer side over all local experts ("grouped",
// at::_grouped_mm: CUTLASS on Hopper GPUs, a composite on CPUs). Chosen by
// MOEPRUNE_EXPERT_GEMM=loop|grouped (default loop), read at start-up.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <vector>

namespace moeprune {

// Seed of expert `expert_id` in MoE layer `layer`: experts are initialised from
// their own generator so that their weights do not depend on placement.
uint64_t expert_seed(uint64_t seed, int layer, int expert_id);

enum class ExpertGemm { Loop, Grouped };
ExpertGemm expert_gemm();                   // from MOEPRUNE_EXPERT_GEMM; UserError on a bad value
void set_expert_gemm(ExpertGemm g);

class ExpertBankImpl : public torch::nn::Module {
 public:
  // expert_ids: the layer's expert ids this rank holds, ascending.
  ExpertBankImpl(int hidden, int mlp_dim, std::vector<int> expert_ids, int layer, uint64_t seed);
  // x: [sum(counts), hidden] rows grouped by local expert; returns [sum(counts), hidden].
  at::Tensor forward(const at::Tensor& x, const std::vector<int64_t>& counts);

  const std::vector<int>& expert_ids() const { return expert_ids_; }
  int num_local() const { return static_cast<int>(expert_ids_.size()); }

  at::Tensor w1, b1, w2, b2;

 private:
  std::vector<int> expert_ids_;
};
TORCH_MODULE(ExpertBank);

}  // namespace moeprune
