// The model as a checkpoint state owner (section "model"): dense parameters as
// replicated tensors under their module names, each expert's slices by (MoE block,
// original expert id), and the layout in the manifest: head size, pruned routing,
// and each MoE layer's surviving experts with the rank that held them. The layout
// is what a job needs to rebuild the model before loading it, on any world size.
#pragma once
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "core/state.h"
#include "model/vit.h"

namespace moeprune {

struct ModelLayout {
  struct Layer {
    int block = 0;            // MoE block index
    std::vector<int> experts;  // original expert ids held by the layer
    std::vector<int> rank;     // rank[i] held experts[i] (its primary copy) at save
    // replicas[i]: the ranks of experts[i]'s other copies (prune.replicate); empty
    // when no expert of the layer has replicas.
    std::vector<std::vector<int>> replicas;
  };
  int num_classes = 0;
  PrunedRouting pruned_routing = PrunedRouting::Drop;
  int world_size = 1;
  std::vector<Layer> layers;
};

ModelLayout layout_of(const VisionTransformer& model);
void to_json(nlohmann::json& j, const ModelLayout& l);
// UserError naming `where` when a field is missing or of the wrong type.
ModelLayout layout_from_json(const nlohmann::json& j, const std::string& where);

// The saved model's config: cfg with the layout's head size and surviving experts.
ModelConfig model_config_of(const ModelConfig& cfg, const ModelLayout& l);
// Placements for world_size ranks: the saved ones (replicas included) when the
// world size is the same, else contiguous blocks of each layer's experts.
std::vector<Placement> placements_of(const ModelLayout& l, int world_size);

class ModelState final : public StateOwner {
 public:
  explicit ModelState(VisionTransformer model) : model_(std::move(model)) {}
  std::string state_key() const override { return "model"; }
  void save_state(StateWriter& out) const override;
  // The model must have been built for the saved layout (model_config_of); the
  // placement may differ from the one at save.
  void load_state(const StateReader& in) override;

 private:
  VisionTransformer model_;
};

}  // namespace moeprune
