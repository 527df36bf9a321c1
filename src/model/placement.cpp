#include "model/placement.h"

#include <algorithm>

#include "core/error.h"

namespace moeprune {

namespace {
std::vector<std::vector<int>> one_each(const std::vector<int>& ranks) {
  std::vector<std::vector<int>> out;
  out.reserve(ranks.size());
  for (int r : ranks) out.push_back({r});
  return out;
}
}  // namespace

Placement::Placement(std::vector<int> expert_rank, int world_size)
    : Placement(one_each(expert_rank), world_size) {}

Placement::Placement(std::vector<std::vector<int>> expert_ranks, int world_size)
    : ranks_(std::move(expert_ranks)), world_size_(world_size) {
  require(world_size > 0, "placement: world size must be positive");
  index();
}

void Placement::index() {
  const int E = static_cast<int>(ranks_.size());
  local_.assign(static_cast<size_t>(world_size_), {});
  expert_rank_.clear();
  first_copy_.clear();
  copy_expert_.clear();
  std::vector<int> copy_rank;
  for (int e = 0; e < E; ++e) {
    const auto& rs = ranks_[static_cast<size_t>(e)];
    require(!rs.empty(), concat("placement: expert ", e, " is on no rank"));
    first_copy_.push_back(static_cast<int>(copy_expert_.size()));
    for (size_t i = 0; i < rs.size(); ++i) {
      const int r = rs[i];
      require(r >= 0 && r < world_size_,
              concat("placement: expert ", e, " on rank ", r, ", expected 0..", world_size_ - 1));
      require(std::find(rs.begin(), rs.begin() + static_cast<std::ptrdiff_t>(i), r) == rs.begin() + static_cast<std::ptrdiff_t>(i),
              concat("placement: expert ", e, " has two copies on rank ", r, " (replicas need distinct ranks)"));
      local_[static_cast<size_t>(r)].push_back(e);
      copy_expert_.push_back(e);
      copy_rank.push_back(r);
    }
    expert_rank_.push_back(rs.front());
  }
  send_slot_.assign(static_cast<size_t>(E), -1);
  send_order_.clear();
  for (int r = 0; r < world_size_; ++r)
    for (int e : local_[static_cast<size_t>(r)])
      if (expert_rank_[static_cast<size_t>(e)] == r) {
        send_slot_[static_cast<size_t>(e)] = static_cast<int>(send_order_.size());
        send_order_.push_back(e);
      }
  if (num_copies() > E) copies_ = std::make_shared<const Placement>(copy_rank, world_size_);
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
    const auto& l = local_[static_cast<size_t>(r)];
    for (size_t i = 0; i < l.size(); ++i) s += concat(i ? "," : "", l[i], rank_of(l[i]) == r ? "" : "'");
    s += "]";
  }
  return s;
}

}  // namespace moeprune
