// The small V-MoE the tests build: 8x8 one-channel images, 4x4 patches (4 tokens +
// class token), hidden 16, MLP 24, 2 heads, MoE every second block, top-2, groups
// of 2 images. Tests change what they need on the returned config.
#pragma once
#include "core/config.h"

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

}  // namespace moeprune::test
