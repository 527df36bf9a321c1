// Which rank holds which expert of one MoE layer. Experts are named by their index
// in the layer (0..E-1); pruning and rebalancing later change the table, so no
// other code may assume contiguous blocks.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moeprune {

class Placement {
 public:
  Placement() = default;
  // expert_rank[e] = rank holding expert e.
  Placement(std::vector<int> expert_rank, int world_size);
  // Contiguous blocks of near-equal size: rank r holds experts [r*E/W, (r+1)*E/W).
  // Throws UserError when E < W (a rank would hold no expert) unless allow_empty,
  // then expert e goes to rank e and the other ranks hold none of the layer.
  static Placement contiguous(int num_experts, int world_size, bool allow_empty = false);

  int num_experts() const { return static_cast<int>(expert_rank_.size()); }
  int world_size() const { return world_size_; }
  int rank_of(int expert) const { return expert_rank_.at(expert); }
  // Experts held by `rank`, ascending: the order of that rank's ExpertBank.
  const std::vector<int>& local_experts(int rank) const { return local_.at(rank); }
  // All experts ordered by (rank, expert): the order of an all-to-all send buffer.
  const std::vector<int>& send_order() const { return send_order_; }
  // send_order()[send_slot(e)] == e.
  int send_slot(int expert) const { return send_slot_.at(expert); }
  const std::vector<int>& expert_rank() const { return expert_rank_; }
  std::string to_string() const;

 private:
  std::vector<int> expert_rank_;
  int world_size_ = 1;
  std::vector<std::vector<int>> local_;
  std::vector<int> send_order_, send_slot_;
};

}  // namespace moeprune
