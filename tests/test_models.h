// The small V-MoE the tests build: 8x8 one-channel images, 4x4 patches (4 tokens +
// class token), hidden 16, MLP 24, 2 heads, MoE every second block, top-2, groups
// of 2 images. Tests change what they need on the returned config.
#pragma once
#include <vector>

#include "core/config.h"
#include "model/placement.h"

namespace moeprune::test {

inline ModelConfig small_vit(int layers, int experts, int classes) {
  ModelConfig m;
  m.image_size = 8;
  m.channels = 1;
  m.patch_size = 4;
  m.hidden = 16;
  m.mlp_dim = 24;
  m.num_layers = layers;
  m.num_heads = 2;
  m.num_classes = classes;
  m.moe.num_experts = experts;
  m.moe.top_k = 2;
  m.moe.every = 2;
  m.moe.group_size = 2;
  return m;
}

// Experts with replicas on N >= 2 ranks, one Placement per MoE layer: expert e's
// primary on rank (e * 3 + 1) % N; expert 0 copied on every rank, expert 1 on two
// (three when N > 2); the rest one copy each.
inline Placement replicated(int experts, int N) {
  std::vector<std::vector<int>> ranks;
  for (int e = 0; e < experts; ++e) ranks.push_back({(e * 3 + 1) % N});
  for (int k = 1; k < N; ++k) ranks[0].push_back((ranks[0][0] + k) % N);
  if (experts > 1) {
    ranks[1].push_back((ranks[1][0] + 1) % N);
    if (N > 2) ranks[1].push_back((ranks[1][0] + 2) % N);
  }
  return Placement(ranks, N);
}

}  // namespace moeprune::test
