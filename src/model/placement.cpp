#include "model/placement.h"

#include "core/error.h"

namespace moeprune {

Placement::Placement(std::vector<int> expert_rank, int world_size)
    : expert_rank_(std::move(expert_rank)), world_size_(world_size), local_(world_size) {
  require(world_size > 0, "placement: world size must be positive");
  for (int e = 0; e < num_experts(); ++e) {
    const int r = expert_rank_[e];
    require(r >= 0 && r < world_size, concat("placement: expert ", e, " on rank ", r, ", expected 0..", world_size - 1));
    local_[r].push_back(e);
  }
  send_slot_.assign(num_experts(), -1);
  for (int r = 0; r < world_size; ++r)
    for (int e : local_[r]) {
      send_slot_[e] = static_cast<int>(send_order_.size());
      send_order_.push_back(e);
    }
}

Placement Placement::contiguous(int num_experts, int world_size, bool allow_empty) {
  if (allow_empty && num_experts < world_size) {
    std::vector<int> ranks(num_experts);
    for (int e = 0; e < num_experts; ++e) ranks[e] = e;
    return Placement(std::move(ranks), world_size);
  }
  require(num_experts >= world_size,
          concat("cannot place ", num_experts, " experts on ", world_size,
              " ranks: every rank must hold at least one expert per MoE layer (expected at most ", num_experts,
              " ranks)"));
  std::vector<int> ranks(num_experts);
  for (int r = 0; r < world_size; ++r) {
    const int begin = static_cast<int>(int64_t{r} * num_experts / world_size);
    const int end = static_cast<int>(int64_t{r + 1} * num_experts / world_size);
    for (int e = begin; e < end; ++e) ranks[e] = r;
  }
  return Placement(std::move(ranks), world_size);
}

std::string Placement::to_string() const {
  std::string s;
  for (int r = 0; r < world_size_; ++r) {
    s += concat(r ? " " : "", "r", r, ":[");
    for (size_t i = 0; i < local_[r].size(); ++i) s += concat(i ? "," : "", local_[r][i]);
    s += "]";
  }
  return s;
}

}  // namespace moeprune
