// Typed job configuration filled from YAML (configs/*.yaml or the embedded
// default), with "--set a.b=c" overrides. Unknown keys and invalid values are
// UserErrors naming the key and what was expected. Validation lives here, in one
// place: parse_config() returns only configs that passed validate().
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moeprune {

struct MoeConfig {
  int num_experts = 8;            // E per MoE layer (all members together for E3)
  int top_k = 2;                  // k experts per token
  int every = 2;                  // MoE in blocks every-1, 2*every-1, ... (0 = off)
  int last = 0;                   // or: MoE in the last `last` odd blocks (0 = off)
  double capacity_factor = 1.05;  // capacity = ceil(S*k*cf/E) rounded up to a multiple of 4
  double noise_std = 1.0;         // router noise std is noise_std / E, training only
  bool bpr = false;               // Batch Prioritized Routing
  int group_size = 8;             // images per routing group
  double importance_loss_weight = 0.005;
  double load_loss_weight = 0.005;
  int ensemble_size = 1;          // E3-MoE members M (1 = plain V-MoE)
};

struct ModelConfig {
  std::string name = "vmoe";
  int image_size = 28;
  int channels = 1;
  int patch_size = 4;
  int hidden = 64;
  int mlp_dim = 128;
  int num_layers = 6;
  int num_heads = 4;
  int num_classes = 10;
  MoeConfig moe;

  int tokens_per_image() const;   // patches + class token
  std::vector<int> moe_blocks() const;  // indices of the MoE blocks, ascending
};

struct TrainConfig {
  uint64_t seed = 0;
  int batch_size = 64;            // global images per step, split across ranks
};

struct JobConfig {
  ModelConfig model;
  TrainConfig train;
  std::string source;             // file path, or "<embedded vmoe-tiny>"
};

// The embedded default (configs/vmoe-tiny.yaml compiled into the binary).
extern const char* const kEmbeddedDefaultConfig;

// path empty -> embedded default. overrides are "a.b.c=value" (value parsed as YAML).
JobConfig parse_config(const std::string& path, const std::vector<std::string>& overrides = {});
JobConfig parse_config_text(const std::string& yaml_text, const std::string& source_name,
                            const std::vector<std::string>& overrides = {});
void validate(const JobConfig& cfg);
// Checks that cfg can run on world_size ranks (expert placement, batch split).
void validate_world(const JobConfig& cfg, int world_size);

}  // namespace moeprune
