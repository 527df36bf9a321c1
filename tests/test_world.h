// Shared state and helpers of the multi-rank tests.
#pragma once
#include <ATen/ATen.h>

#include "dist/world.h"

namespace moeprune::test {

extern World* g_world;

// max |a - b| / max(max |b|, tiny): the relative error the oracle tests bound.
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const double scale = std::max(b.abs().max().item<double>(), 1e-12);
  return (a - b).abs().max().item<double>() / scale;
}

}  // namespace moeprune::test
