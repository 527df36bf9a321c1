// Where `moeprune predict` and `moeprune ckpt import|export-vmoe` take a model from:
// a vmoe checkpoint prefix (google-research/vmoe's released format; the
// architecture comes from the checkpoint), a sharded moeprune checkpoint or
// checkpoint root (its latest checkpoint; layout from the manifest), or a moeprune
// model file (.safetensors; head and pre_logits sizes from the file, the rest from
// the config), or "random": the config's model with fresh weights from the job seed
// (synthetic checkpoints for memory and speed measurements). Collective: every rank
// builds the model for the job's world size and loads its own experts; errors are
// agreed on every rank.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"
#include "dist/world.h"
#include "model/vit.h"

namespace moeprune {

enum class SourceKind { Vmoe, Checkpoint, ModelFile, Random };

struct SourceModel {
  VisionTransformer model{nullptr};
  SourceKind kind = SourceKind::ModelFile;
  std::string path;         // the checkpoint or file actually read
  std::string description;  // one line for the log: what was read
  // How the model's training scaled pixels in [0, 1]: (x - mean) / std per channel
  // (a checkpoint: its own config's data.augment; a vmoe model: [-1, 1]).
  std::vector<double> pixel_mean, pixel_std;
};

// arch_from_config: a vmoe checkpoint must match cfg.model (a mismatch names the leaf)
// instead of determining the architecture.
SourceModel load_source_model(const JobConfig& cfg, const std::string& src, World& world,
                              bool arch_from_config = false);

}  // namespace moeprune
