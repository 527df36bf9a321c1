// Derived values of the config types (config.h).
#include <algorithm>

#include "core/config.h"

namespace moeprune {

int PhaseConfig::num_labels() const {
  if (!label_map.empty()) return *std::max_element(label_map.begin(), label_map.end()) + 1;
  return static_cast<int>(classes.size());
}

std::vector<int> ModelConfig::layer_experts(int block) const {
  auto it = kept_experts.find(block);
  if (it != kept_experts.end()) return it->second;
  std::vector<int> all(static_cast<size_t>(moe.num_experts));
  for (int e = 0; e < moe.num_experts; ++e) all[static_cast<size_t>(e)] = e;
  return all;
}

int ModelConfig::tokens_per_image() const {
  const int side = image_size / patch_size;
  return side * side + 1;
}

std::vector<int> ModelConfig::moe_blocks() const {
  std::vector<int> blocks;
  if (moe.every > 0) {
    for (int b = moe.every - 1; b < num_layers; b += moe.every) blocks.push_back(b);
  } else if (moe.last > 0) {
    // The last `last` odd blocks (as V-MoE's "Last-n": 1, 3, 5, ... counted from the end).
    for (int b = num_layers - 1; b >= 0 && static_cast<int>(blocks.size()) < moe.last; --b)
      if (b % 2 == 1) blocks.insert(blocks.begin(), b);
  }
  return blocks;
}

uint64_t phase_seed(const JobConfig& cfg, const PhaseConfig& phase) {
  return phase.seed >= 0 ? static_cast<uint64_t>(phase.seed) : cfg.seed;
}

std::string checkpoint_dir(const JobConfig& cfg) {
  return cfg.checkpoint.dir.empty() ? cfg.output.dir + "/checkpoints" : cfg.checkpoint.dir;
}

}  // namespace moeprune
