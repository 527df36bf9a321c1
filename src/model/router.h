// The V-MoE router ("noisy top-k per item", google-research/vmoe): bias-free
// dense logits, Gaussian noise of std noise_std/E while training, softmax over the
// experts, top-k. Combine weights are the softmax probabilities (not
// renormalised). Each routing group has a capacity per expert; all top-1 choices
// take slots before any top-2 choice, optionally in Batch Prioritized Routing
// order, and choices beyond capacity are dropped.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace moeprune {

struct RouterOptions {
  int num_experts = 8;  // experts this router chooses among
  int top_k = 2;
  double capacity_factor = 1.05;
  double noise_std = 1.0;  // the noise std is noise_std / num_experts
  bool bpr = false;
  double init_std = 0;  // std of the initial kernel; 0 = 1/sqrt(hidden) (vmoe: flax lecun_normal)
};

// What the router decided for N = G*S tokens (G groups of S tokens).
struct Routing {
  at::Tensor expert;    // [N, k] int64, expert index in [0, num_experts)
  at::Tensor gate;      // [N, k] float, softmax probability of that expert (differentiable)
  at::Tensor keep;      // [N, k] bool, false where the choice was dropped for capacity
  at::Tensor position;  // [N, k] int64, slot of the choice in its (group, expert) buffer
  at::Tensor probs;     // [N, E] float, softmax probabilities (for soft counts)
  at::Tensor importance_loss;  // scalar: sum over groups of CV(importance)^2
  at::Tensor load_loss;        // scalar: sum over groups of CV(load)^2 (0 without noise)
  at::Tensor entropy;          // scalar: sum over groups of the mean token entropy of probs
  int64_t capacity = 0;
  int64_t group_tokens = 0;    // S
  int64_t num_groups = 0;      // G
};

// The top-k experts of every token and their capacity slots: [G, S, k] each.
struct Selection {
  at::Tensor expert;    // int64, choice 0 is the largest probability (ties to the lower index)
  at::Tensor gate;      // float, that probability (differentiable: gathered from probs)
  at::Tensor position;  // int64, slot in the (group, expert) buffer; -1 for invalid tokens
  at::Tensor keep;      // bool, false beyond capacity and for invalid tokens
};

// How top-k and capacity slots are computed: the one step of routing a dispatcher
// backend implements (model/dispatcher.h). Semantics of assign_slots() below.
class SlotSelector {
 public:
  virtual ~SlotSelector() = default;
  // probs [G, S, E] float32; token_valid [G, S] bool (optional).
  virtual Selection select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                           const at::Tensor& token_valid) const = 0;
};

// The reference: at::topk and assign_slots().
class TorchSelector final : public SlotSelector {
 public:
  Selection select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                   const at::Tensor& token_valid) const override;
};

// ceil(group_tokens * k * capacity_factor / E), rounded up to a multiple of 4.
int64_t expert_capacity(int64_t group_tokens, int top_k, double capacity_factor, int num_experts);

// The order in which a group's tokens take capacity slots: [G, S] token indices,
// token order, or with BPR by descending top-1 gate (stable); tokens marked
// invalid in token_valid [G, S] (optional) come after all valid ones.
at::Tensor priority_order(const at::Tensor& top_gate, bool bpr, const at::Tensor& token_valid = {});

// top_expert, top_gate: [G, S, k] (choice 0 is the largest gate). Returns
// {position [G,S,k] int64, keep [G,S,k] bool}: choice j of every token takes its
// slot after all choices < j of the group; within a choice rank, tokens go in
// order (or by descending top-1 gate with bpr).
// token_valid [G, S] (optional): invalid tokens take no slot (keep false, position
// -1) and do not delay valid ones.
std::pair<at::Tensor, at::Tensor> assign_slots(const at::Tensor& top_expert, const at::Tensor& top_gate,
                                               int num_experts, int64_t capacity, bool bpr,
                                               const at::Tensor& token_valid = {});

// probs: [G, S, E] -> sum over groups of (std/mean of per-expert probability mass)^2.
at::Tensor importance_loss(const at::Tensor& probs);
// logits (without noise), noisy_logits: [G, S, E]. Sum over groups of the squared
// CV of each expert's probability of being selected under re-drawn noise (V-MoE).
at::Tensor load_loss(const at::Tensor& logits, const at::Tensor& noisy_logits, double noise_std, int top_k);

class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(int hidden, RouterOptions opts);
  // x: [G, S, hidden]. noise_seeds: G seeds (one per group) used while training, so
  // the noise of a group is the same whichever rank routes it. selector: how top-k
  // and slots are computed (the dispatcher backend's, or TorchSelector).
  // top_k > 0 overrides the configured k (SEER-MoE: evaluate with fewer experts).
  // token_valid [G, S] bool (optional): invalid tokens go after all valid ones in the
  // BPR priority order and are marked not kept.
  // column_keep [E] bool (optional): columns that are false are masked out as if the
  // router did not have them (softmax, top-k and capacity over the others), the
  // cheap stand-in for a router whose pruned columns were dropped.
  Routing forward(const at::Tensor& x, bool train, const std::vector<uint64_t>& noise_seeds,
                  const SlotSelector& selector, int top_k = 0, const at::Tensor& token_valid = {},
                  const at::Tensor& column_keep = {});

  const RouterOptions& options() const { return opts_; }
  at::Tensor weight;  // [hidden, E]: column e is expert e's router weight

 private:
  RouterOptions opts_;
};
TORCH_MODULE(Router);

}  // namespace moeprune
