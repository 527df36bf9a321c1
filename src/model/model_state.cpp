#include "model/model_state.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeprune {
using json = nlohmann::json;

ModelLayout layout_of(const VisionTransformer& model) {
  ModelLayout l;
  l.num_classes = model->config().num_classes;
  l.pruned_routing = model->config().pruned_routing;
  for (const auto& layer : model->moe_layers()) {
    l.world_size = layer->placement().world_size();
    const Placement& pl = layer->placement();
    ModelLayout::Layer x{layer->layer(), layer->expert_ids(), pl.expert_rank(), {}};
    if (pl.has_replicas())
      for (const auto& rs : pl.expert_ranks()) x.replicas.emplace_back(rs.begin() + 1, rs.end());
    l.layers.push_back(std::move(x));
  }
  return l;
}

void to_json(json& j, const ModelLayout& l) {
  json layers = json::array();
  for (const auto& x : l.layers) {
    json one = {{"block", x.block}, {"experts", x.experts}, {"rank", x.rank}};
    if (!x.replicas.empty()) one["replicas"] = x.replicas;
    layers.push_back(std::move(one));
  }
  j = {{"num_classes", l.num_classes}, {"pruned_routing", name_of(l.pruned_routing)}, {"world_size", l.world_size},
       {"moe_layers", layers}};
}

ModelLayout layout_from_json(const json& j, const std::string& where) {
  ModelLayout l;
  try {
    l.num_classes = j.at("num_classes").get<int>();
    l.pruned_routing = parse_choice<PrunedRouting>(j.at("pruned_routing").get<std::string>(),
                                                   concat(where, ": model.pruned_routing"));
    l.world_size = j.at("world_size").get<int>();
    for (const auto& x : j.at("moe_layers"))
      l.layers.push_back({x.at("block").get<int>(), x.at("experts").get<std::vector<int>>(),
                          x.at("rank").get<std::vector<int>>(),
                          x.value("replicas", std::vector<std::vector<int>>{})});
  } catch (const json::exception& e) {
    throw UserError(concat(where, ": the model layout lacks a field or has a wrong type: ", e.what()));
  }
  require(l.world_size >= 1, concat(where, ": model.world_size ", l.world_size, " must be >= 1"));
  require(l.num_classes >= 1, concat(where, ": model.num_classes ", l.num_classes, " must be >= 1"));
  for (const auto& x : l.layers) {
    require(x.experts.size() == x.rank.size(), concat(where, ": MoE block ", x.block, " lists ", x.experts.size(),
                                                      " experts but ", x.rank.size(), " ranks"));
    for (size_t i = 0; i < x.experts.size(); ++i) {
      require(x.rank[i] >= 0 && x.rank[i] < l.world_size,
              concat(where, ": MoE block ", x.block, " places expert ", x.experts[i], " on rank ", x.rank[i],
                     ", expected 0..", l.world_size - 1, " (saved on ", l.world_size, " ranks)"));
      require(x.experts[i] >= 0 && (i == 0 || x.experts[i] > x.experts[i - 1]),
              concat(where, ": MoE block ", x.block, " lists experts out of order or twice (expected ascending ids)"));
    }
    require(x.replicas.empty() || x.replicas.size() == x.experts.size(),
            concat(where, ": MoE block ", x.block, " lists replicas for ", x.replicas.size(), " of its ",
                   x.experts.size(), " experts (expected all or none)"));
    for (size_t i = 0; i < x.replicas.size(); ++i)
      for (size_t j = 0; j < x.replicas[i].size(); ++j) {
        const int r = x.replicas[i][j];
        const bool seen = r == x.rank[i] || std::find(x.replicas[i].begin(), x.replicas[i].begin() + static_cast<std::ptrdiff_t>(j), r) !=
                                                x.replicas[i].begin() + static_cast<std::ptrdiff_t>(j);
        require(r >= 0 && r < l.world_size && !seen,
                concat(where, ": MoE block ", x.block, " places a replica of expert ", x.experts[i], " on rank ", r,
                       ", expected a rank in 0..", l.world_size - 1, " holding no other copy of it"));
      }
  }
  return l;
}

ModelConfig model_config_of(const ModelConfig& cfg, const ModelLayout& l) {
  ModelConfig out = cfg;
  out.num_classes = l.num_classes;
  out.pruned_routing = l.pruned_routing;
  out.kept_experts.clear();
  for (const auto& x : l.layers)
    if (static_cast<int>(x.experts.size()) != cfg.moe.num_experts) out.kept_experts[x.block] = x.experts;
  return out;
}

std::vector<Placement> placements_of(const ModelLayout& l, int world_size) {
  std::vector<Placement> out;
  for (const auto& x : l.layers) {
    const int n = static_cast<int>(x.experts.size());
    if (l.world_size != world_size) {
      out.push_back(Placement::contiguous(n, world_size, /*allow_empty=*/true));
      continue;
    }
    std::vector<std::vector<int>> ranks;
    for (size_t i = 0; i < x.rank.size(); ++i) {
      ranks.push_back({x.rank[i]});
      if (!x.replicas.empty()) ranks.back().insert(ranks.back().end(), x.replicas[i].begin(), x.replicas[i].end());
    }
    out.push_back(Placement(std::move(ranks), world_size));
  }
  return out;
}

void ModelState::save_state(StateWriter& out) const {
  at::NoGradGuard ng;
  for (const auto& item : model_->named_parameters()) {
    const std::string& name = item.key();
    if (!is_expert_param(name)) {
      out.replicated(name, item.value());
      continue;
    }
    const int block = block_of_param(name);
    const MoeLayer layer = moe_layer_of(model_, block);
    const auto& ids = layer->experts->expert_ids();
    const std::vector<bool> primary = layer->primary_copies();  // replicas are not written
    for (size_t i = 0; i < ids.size(); ++i)
      if (primary[i]) out.expert(name, block, ids[i], item.value()[static_cast<int64_t>(i)]);
  }
  to_json(out.meta(), layout_of(model_));
}

void ModelState::load_state(const StateReader& in) {
  at::NoGradGuard ng;
  const ModelLayout saved = layout_from_json(in.meta(), in.where());
  const ModelLayout now = layout_of(model_);
  require(now.layers.size() == saved.layers.size(), concat("checkpoint ", in.where(), " has ", saved.layers.size(),
                                                           " MoE layers, the model has ", now.layers.size()));
  require(saved.num_classes == now.num_classes, concat("checkpoint ", in.where(), " has a head of ",
                                                       saved.num_classes, " classes, the model has ", now.num_classes));
  for (size_t i = 0; i < now.layers.size(); ++i) {
    const auto &s = saved.layers[i], &n = now.layers[i];
    require(s.block == n.block, concat("checkpoint ", in.where(), ": MoE layer ", i, " is block ", s.block,
                                       ", the model has block ", n.block));
    require(s.experts == n.experts,
            concat("checkpoint ", in.where(), ": block ", s.block, " has ", s.experts.size(), " experts, the model has ",
                   n.experts.size(), " (or other ids); build the model with model_config_of()"));
  }
  for (auto& item : model_->named_parameters()) {
    const std::string& name = item.key();
    at::Tensor p = item.value();
    if (!is_expert_param(name)) {
      p.copy_(in.replicated(name, p.sizes()));
      continue;
    }
    const int block = block_of_param(name);
    const auto& ids = local_expert_ids(model_, block);
    for (size_t i = 0; i < ids.size(); ++i)
      p[static_cast<int64_t>(i)].copy_(in.expert(name, block, ids[i], p.sizes().slice(1)));
  }
}

}  // namespace moeprune
