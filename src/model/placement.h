// Which ranks hold which expert of one MoE layer. Experts are named by their index
// in the layer (0..E-1); pruning and rebalancing later change the table, so no
// other code may assume contiguous blocks.
//
// An expert may have replicas: copies on other ranks (after pruning, on ranks the
// pruned experts freed; prune.replicate). Each copy is a "copy slot": expert e's
// copies are slots first_copy(e) .. first_copy(e) + replicas(e) - 1, the primary
// (the copy checkpoints and the model file take) first. copies() is the placement
// of the copy slots, one rank each: what the dispatcher moves tokens to and what
// the ranks' expert banks hold. Replicas of one expert sit on distinct ranks.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeprune {

class Placement {
 public:
  Placement() = default;
  // expert_rank[e] = the one rank holding expert e.
  Placement(std::vector<int> expert_rank, int world_size);
  // expert_ranks[e] = the ranks holding a copy of expert e, primary first: at least
  // one, distinct, each in 0..world_size-1.
  Placement(std::vector<std::vector<int>> expert_ranks, int world_size);
  // Contiguous blocks of near-equal size: rank r holds experts [r*E/W, (r+1)*E/W).
  // Throws UserError when E < W (a rank would hold no expert) unless allow_empty,
  // then expert e goes to rank e and the other ranks hold none of the layer.
  static Placement contiguous(int num_experts, int world_size, bool allow_empty = false);

  int num_experts() const { return static_cast<int>(expert_rank_.size()); }
  int world_size() const { return world_size_; }
  // The rank holding expert e's primary copy.
  int rank_of(int expert) const { return expert_rank_.at(expert); }
  // Experts with a copy on `rank`, ascending: the order of that rank's ExpertBank.
  const std::vector<int>& local_experts(int rank) const { return local_.at(rank); }
  // All experts ordered by (rank, expert): the order of an all-to-all send buffer
  // (without replicas; see copies()).
  const std::vector<int>& send_order() const { return send_order_; }
  // send_order()[send_slot(e)] == e.
  int send_slot(int expert) const { return send_slot_.at(expert); }
  // Primary rank of every expert.
  const std::vector<int>& expert_rank() const { return expert_rank_; }
  // Every expert's ranks, primary first.
  const std::vector<std::vector<int>>& expert_ranks() const { return ranks_; }
  const std::vector<int>& ranks_of(int expert) const { return ranks_.at(expert); }
  int replicas(int expert) const { return static_cast<int>(ranks_.at(expert).size()); }
  bool has_replicas() const { return num_copies() > num_experts(); }
  // Copy slots (see above).
  int num_copies() const { return static_cast<int>(copy_expert_.size()); }
  int first_copy(int expert) const { return first_copy_.at(expert); }
  int copy_expert(int copy) const { return copy_expert_.at(copy); }
  // The placement of the copy slots (one rank each); *this when there are no replicas.
  const Placement& copies() const { return copies_ ? *copies_ : *this; }
  std::string to_string() const;

 private:
  void index();

  std::vector<int> expert_rank_;
  std::vector<std::vector<int>> ranks_;
  int world_size_ = 1;
  std::vector<std::vector<int>> local_;
  std::vector<int> send_order_, send_slot_;
  std::vector<int> first_copy_, copy_expert_;
  std::shared_ptr<const Placement> copies_;  // set only with replicas
};

}  // namespace moeprune
