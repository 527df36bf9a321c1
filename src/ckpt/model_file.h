// A whole model in one safetensors file, independent of the world size: dense
// parameters under their module names, each MoE layer's experts stacked in expert
// id order ([E, ...]). Rank 0 gathers the experts and writes atomically; every
// rank loads the experts it holds. (Sharded checkpoints with optimiser state build
// on this later.)
#pragma once
#include <map>
#include <string>

#include "dist/world.h"
#include "model/vit.h"

namespace moeprune {

// Collective. Writes path atomically (temporary name, fsync, rename) from rank 0.
void save_model(const std::string& path, const VisionTransformer& model, Communicator& host,
                const std::map<std::string, std::string>& metadata = {});

// Collective over host: the whole [E_l, ...] tensor of expert parameter `name`
// (rows in layer slot order, i.e. ascending expert id) on rank 0; undefined elsewhere.
at::Tensor gather_expert_param(const VisionTransformer& model, const std::string& name, Communicator& host);

struct LoadOptions {
  bool new_head = false;  // zero-initialise the classifier head (fine-tuning on a new task)
};

// Every rank reads path and fills its parameters; experts are taken by id.
// Position embeddings are resized (bilinear on the patch grid) when the
// resolution differs. Throws UserError naming the file and tensor on any mismatch.
// Returns the file's metadata.
std::map<std::string, std::string> load_model(const std::string& path, VisionTransformer& model,
                                              const LoadOptions& opts = {});

}  // namespace moeprune
