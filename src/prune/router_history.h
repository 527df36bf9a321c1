// How each expert's router weights moved during fine-tuning, and how many tokens it
// served. The reference is the routers of the loaded (pretrained) model; records
// hold, per MoE layer and expert, ‖w_ft‖₂ − ‖w_pre‖₂ of the expert's router column
// (Chowdhury et al., ICML 2024), ‖w_ft − w_pre‖₂, top-k assignments, kept
// assignments, soft counts and dropped assignments, summed over ranks since
// fine-tuning began. Router weights are replicated, so every rank computes the
// same norms; counts are all-reduced.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "core/state.h"
#include "dist/communicator.h"
#include "model/vit.h"

namespace moeprune {

struct ExpertRecord {
  double norm_change = 0;  // ‖w_ft‖ − ‖w_pre‖
  double delta_norm = 0;   // ‖w_ft − w_pre‖
  int64_t assigned = 0;    // top-k choices
  int64_t kept = 0;        // choices within capacity
  int64_t dropped = 0;     // assigned − kept
  double soft = 0;         // sum of router probabilities
};

struct HistoryRecord {
  int64_t step = 0;
  std::map<int, std::vector<ExpertRecord>> layers;  // MoE block index -> experts of the layer
};

// All router columns of an MoE layer as one [hidden, E] matrix (E3 members' columns in member order).
at::Tensor layer_router_weights(const MoeLayerImpl& layer);

// A checkpoint state owner (section "router_history"): the reference routers as
// "history.reference.<block>" tensors, counts and records in the manifest.
class RouterHistory final : public StateOwner {
 public:
  // Takes the current router weights of every MoE layer as the reference.
  void snapshot(const VisionTransformer& model);
  // Adds one step's routing statistics of this rank.
  void accumulate(const RoutingStats& stats);
  // Collective: builds a record at `step` from the current routers and the counts so far.
  const HistoryRecord& record(Communicator& host, const VisionTransformer& model, int64_t step);

  const std::map<int, at::Tensor>& reference() const { return reference_; }
  const RoutingStats& counts() const { return counts_; }
  const std::vector<HistoryRecord>& records() const { return records_; }
  // The record as JSON text: {"step":..,"layers":{"1":[{"expert":0,"norm_change":..},..]}}.
  static std::string to_json(const HistoryRecord& r);
  // Writes every record (JSON array) to path.
  void save(const std::string& path) const;

  std::string state_key() const override { return "router_history"; }
  void save_state(StateWriter& out) const override;
  void load_state(const StateReader& in) override;

 private:
  std::map<int, at::Tensor> reference_;
  RoutingStats counts_;
  std::vector<HistoryRecord> records_;
};

}  // namespace moeprune
