#include "prune/router_history.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeprune {

at::Tensor layer_router_weights(const MoeLayerImpl& layer) {
  std::vector<at::Tensor> cols;
  for (const auto& r : *layer.routers) cols.push_back(r->as<RouterImpl>()->weight.detach());
  return cols.size() == 1 ? cols[0] : at::cat(cols, 1);
}

void RouterHistory::snapshot(const VisionTransformer& model) {
  reference_.clear();
  counts_.clear();
  records_.clear();
  for (const auto& l : model->moe_layers()) reference_[l->layer()] = layer_router_weights(*l).to(at::kCPU).clone();
}

void RouterHistory::accumulate(const RoutingStats& stats) {
  for (const auto& [layer, s] : stats) counts_[layer].add(s);
}

const HistoryRecord& RouterHistory::record(Communicator& host, const VisionTransformer& model, int64_t step) {
  RoutingStats total = counts_;
  for (const auto& l : model->moe_layers()) {
    LayerStats& s = total[l->layer()];
    if (s.assigned.empty()) {  // no step yet: zeros of the right size
      const size_t E = static_cast<size_t>(reference_.at(l->layer()).size(1));
      s.assigned.assign(E, 0);
      s.kept.assign(E, 0);
      s.soft.assign(E, 0.0);
    }
  }
  all_reduce_stats(total, host);
  HistoryRecord rec;
  rec.step = step;
  for (const auto& l : model->moe_layers()) {
    const int id = l->layer();
    at::Tensor now = layer_router_weights(*l).to(at::kCPU).to(at::kDouble);
    at::Tensor ref = reference_.at(id).to(at::kDouble);
    require(now.sizes() == ref.sizes(), concat("router history: layer ", id, " router is ", now.sizes(),
                                               " but the reference is ", ref.sizes()));
    at::Tensor change = now.norm(2, {0}) - ref.norm(2, {0});
    at::Tensor delta = (now - ref).norm(2, {0});
    const LayerStats& s = total.at(id);
    std::vector<ExpertRecord> experts(static_cast<size_t>(now.size(1)));
    for (int64_t e = 0; e < now.size(1); ++e) {
      ExpertRecord& x = experts[static_cast<size_t>(e)];
      x.norm_change = change[e].item<double>();
      x.delta_norm = delta[e].item<double>();
      x.assigned = s.assigned[e];
      x.kept = s.kept[e];
      x.dropped = s.assigned[e] - s.kept[e];
      x.soft = s.soft[e];
    }
    rec.layers[id] = std::move(experts);
  }
  records_.push_back(std::move(rec));
  return records_.back();
}

namespace {
nlohmann::json stats_json(const RoutingStats& m) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [layer, s] : m)
    out[std::to_string(layer)] = {{"assigned", s.assigned}, {"kept", s.kept}, {"soft", s.soft}, {"tokens", s.tokens}};
  return out;
}

RoutingStats stats_from(const nlohmann::json& j) {
  RoutingStats out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    LayerStats s;
    s.assigned = it.value().at("assigned").get<std::vector<int64_t>>();
    s.kept = it.value().at("kept").get<std::vector<int64_t>>();
    s.soft = it.value().at("soft").get<std::vector<double>>();
    s.tokens = it.value().at("tokens").get<int64_t>();
    out[std::stoi(it.key())] = s;
  }
  return out;
}

HistoryRecord record_from(const nlohmann::json& r) {
  HistoryRecord rec;
  rec.step = r.at("step").get<int64_t>();
  for (auto it = r.at("layers").begin(); it != r.at("layers").end(); ++it) {
    std::vector<ExpertRecord> experts;
    for (const auto& x : it.value())
      experts.push_back(ExpertRecord{x.at("norm_change").get<double>(), x.at("delta_norm").get<double>(),
                                     x.at("assigned").get<int64_t>(), x.at("kept").get<int64_t>(),
                                     x.at("dropped").get<int64_t>(), x.at("soft").get<double>()});
    rec.layers[std::stoi(it.key())] = std::move(experts);
  }
  return rec;
}

nlohmann::json record_json(const HistoryRecord& r) {
  nlohmann::json layers = nlohmann::json::object();
  for (const auto& [id, experts] : r.layers) {
    nlohmann::json arr = nlohmann::json::array();
    for (size_t e = 0; e < experts.size(); ++e) {
      const ExpertRecord& x = experts[e];
      arr.push_back({{"expert", e}, {"norm_change", x.norm_change}, {"delta_norm", x.delta_norm},
                     {"assigned", x.assigned}, {"kept", x.kept}, {"dropped", x.dropped}, {"soft", x.soft}});
    }
    layers[std::to_string(id)] = arr;
  }
  return {{"step", r.step}, {"layers", layers}};
}
}  // namespace

std::string RouterHistory::to_json(const HistoryRecord& r) { return record_json(r).dump(); }

void RouterHistory::save_state(StateWriter& out) const {
  std::vector<int> blocks;
  for (const auto& [block, ref] : reference_) {
    out.replicated(concat("history.reference.", block), ref);
    blocks.push_back(block);
  }
  nlohmann::json records = nlohmann::json::array();
  for (const auto& r : records_) records.push_back(record_json(r));
  out.meta() = {{"reference_blocks", blocks}, {"counts", stats_json(counts_)}, {"records", records}};
}

void RouterHistory::load_state(const StateReader& in) {
  reference_.clear();
  records_.clear();
  try {
    for (int block : in.meta().at("reference_blocks").get<std::vector<int>>())
      reference_[block] = in.replicated(concat("history.reference.", block)).clone();
    counts_ = stats_from(in.meta().at("counts"));
    for (const auto& r : in.meta().at("records")) records_.push_back(record_from(r));
  } catch (const nlohmann::json::exception& e) {
    throw UserError(concat("checkpoint ", in.where(), ": the router history lacks a field or has a wrong type: ",
                           e.what()));
  } catch (const std::invalid_argument& e) {
    throw UserError(concat("checkpoint ", in.where(), ": the router history names a block that is not a number"));
  }
}

void RouterHistory::save(const std::string& path) const {
  nlohmann::json all = nlohmann::json::array();
  for (const auto& r : records_) all.push_back(record_json(r));
  std::ofstream out(path);
  require(out.good(), concat("cannot write '", path, "'"));
  out << all.dump(1) << "\n";
}

}  // namespace moeprune
