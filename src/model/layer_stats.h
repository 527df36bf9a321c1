// Routing statistics of MoE layers: what the router chose, what got a capacity
// slot, and the soft (probability) mass per expert. Produced by the MoE layers
// during a forward pass (per rank), summed over steps by training, over ranks by
// all_reduce_stats, and read by evaluation, router history and pruning.
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "dist/communicator.h"

namespace moeprune {

// Routing statistics of one MoE layer (per expert of the layer, in its slot order).
struct LayerStats {
  std::vector<int64_t> assigned;  // top-k choices, before capacity
  std::vector<int64_t> kept;      // choices that got a capacity slot
  std::vector<double> soft;       // sum of router probabilities
  int64_t tokens = 0;             // routed tokens (E3: per member copy)
  void add(const LayerStats& o);
};

// Statistics of every MoE layer, by MoE block index.
using RoutingStats = std::map<int, LayerStats>;

// Sums stats over ranks (host collective); every rank must hold the same blocks.
void all_reduce_stats(RoutingStats& stats, Communicator& host);

}  // namespace moeprune
