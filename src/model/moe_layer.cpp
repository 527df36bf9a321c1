#include "model/moe_layer.h"

#include <ATen/autocast_mode.h>

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "model/expert_bank.h"

namespace moeprune {

MoeLayerImpl::MoeLayerImpl(const ModelConfig& cfg, int layer, Placement placement, Communicator& comm,
                           uint64_t seed)
    : cfg_(cfg), layer_(layer), ids_(cfg.layer_experts(layer)), placement_(std::move(placement)),
      dispatcher_(comm, placement_) {
  const MoeConfig& m = cfg.moe;
  const int E_l = static_cast<int>(ids_.size());
  require(placement_.num_experts() == E_l,
          concat("MoE layer ", layer, ": placement has ", placement_.num_experts(), " experts, the layer has ", E_l));
  require(placement_.world_size() == comm.size(),
          concat("MoE layer ", layer, ": placement is for ", placement_.world_size(), " ranks, the job has ",
                 comm.size()));
  const bool pruned = E_l < m.num_experts;
  const bool drop = !pruned || cfg.pruned_routing == "drop";
  require(cfg.pruned_routing == "drop" || cfg.pruned_routing == "zero",
          concat("MoE layer ", layer, ": pruned routing '", cfg.pruned_routing, "', expected drop or zero"));
  const int per_member = m.num_experts / m.ensemble_size;
  routers = register_module("routers", torch::nn::ModuleList());
  for (int mem = 0; mem < m.ensemble_size; ++mem) {
    // Router columns of this member and the layer slot each one feeds.
    std::vector<int64_t> col_slot;
    std::vector<int> col_ids;
    for (int j = 0; j < per_member; ++j) {
      const int id = mem * per_member + j;
      const auto it = std::lower_bound(ids_.begin(), ids_.end(), id);
      const int64_t slot = (it != ids_.end() && *it == id) ? it - ids_.begin() : -1;
      if (drop && slot < 0) continue;  // drop: no column for a pruned expert
      col_slot.push_back(slot);
      col_ids.push_back(id);
    }
    column_ids_.push_back(col_ids);
    int alive = 0;
    for (int64_t s2 : col_slot) alive += s2 >= 0;
    require(alive >= m.top_k, concat("MoE layer ", layer, ": E3 member ", mem, " keeps ", alive,
                                     " experts, fewer than top_k=", m.top_k));
    RouterOptions ro{static_cast<int>(col_slot.size()), m.top_k, m.capacity_factor, m.noise_std, m.bpr};
    routers->push_back(Router(cfg.hidden, ro));
    column_slot_.push_back(register_buffer(concat("column_slot_", mem), at::tensor(col_slot, at::kLong)));
  }
  std::vector<int> local;
  for (int s2 : placement_.local_experts(comm.rank())) local.push_back(ids_[static_cast<size_t>(s2)]);
  experts = register_module("experts", ExpertBank(cfg.hidden, cfg.mlp_dim, local, layer, seed));
}

int MoeLayerImpl::routed_experts(int member) const {
  return static_cast<int>((column_slot_.at(member) >= 0).sum().item<int64_t>());
}

void LayerStats::add(const LayerStats& o) {
  if (assigned.empty()) {
    *this = o;
    return;
  }
  for (size_t e = 0; e < assigned.size(); ++e) {
    assigned[e] += o.assigned[e];
    kept[e] += o.kept[e];
    soft[e] += o.soft[e];
  }
  tokens += o.tokens;
}

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

at::Tensor MoeLayerImpl::forward(const at::Tensor& x, ForwardContext& ctx) {
  const int M = cfg_.moe.ensemble_size;
  const int64_t rows = x.size(0), T = x.size(1), H = x.size(2);
  TORCH_CHECK(rows % M == 0, "MoE layer: batch rows not divisible by ensemble size");
  const int64_t B = rows / M;
  const int64_t gs = cfg_.moe.group_size;
  TORCH_CHECK(B % gs == 0, "MoE layer: ", B, " images per member is not a multiple of group_size ", gs);
  const int64_t G = B / gs;

  std::vector<at::Tensor> expert, gate, keep, group, position, soft, assigned_mask;
  int64_t capacity = 0;
  at::Tensor token_valid, choice_valid;  // [G, gs*T] and [G*gs*T, 1]: padding images are not routed
  if (ctx.image_valid.defined()) {
    TORCH_CHECK(ctx.image_valid.numel() == B, "MoE layer: image_valid has ", ctx.image_valid.numel(),
                " entries for ", B, " images");
    token_valid = ctx.image_valid.to(x.device()).to(at::kBool).view({G, gs}).repeat_interleave(T, 1);
    choice_valid = token_valid.reshape({-1, 1});
  }
  auto t0 = Clock::now();
  for (int m = 0; m < M; ++m) {
    at::Tensor xm = x.narrow(0, m * B, B).reshape({G, gs * T, H});
    std::vector<uint64_t> seeds(G);
    for (int64_t g = 0; g < G; ++g)
      seeds[g] = expert_seed(ctx.noise_seed, layer_, static_cast<int>((m * ctx.total_groups + ctx.first_group + g)));
    Routing r = routers[m]->as<RouterImpl>()->forward(xm, ctx.train, seeds, ctx.top_k, token_valid);
    const double wi = cfg_.moe.importance_loss_weight, wl = cfg_.moe.load_loss_weight;
    at::Tensor aux = r.importance_loss * wi + r.load_loss * wl;
    if (ctx.entropy_weight > 0) aux = aux + r.entropy * ctx.entropy_weight;
    ctx.aux_loss = ctx.aux_loss.defined() ? ctx.aux_loss + aux : aux;
    // Router columns -> layer slots; a choice of a pruned expert ("zero" routing) is
    // dropped: it contributes nothing and costs nothing.
    at::Tensor slot = column_slot_[m].index_select(0, r.expert.reshape({-1})).view_as(r.expert);
    at::Tensor alive = slot >= 0;
    expert.push_back(slot.clamp_min(0));
    gate.push_back(r.gate);
    keep.push_back(r.keep.logical_and(alive));
    if (ctx.stats) assigned_mask.push_back(choice_valid.defined() ? alive.logical_and(choice_valid) : alive);
    // Groups of member m follow those of members < m in the dispatch order.
    group.push_back((at::arange(G, r.expert.options()) + m * G).repeat_interleave(gs * T).unsqueeze(1).expand_as(r.expert));
    position.push_back(r.position);
    if (ctx.stats) {
      at::Tensor pr = r.probs.detach();
      if (choice_valid.defined()) pr = pr * choice_valid.to(pr.scalar_type());
      at::Tensor cols = pr.sum(0).to(at::kDouble);
      at::Tensor ok = column_slot_[m] >= 0;
      soft.push_back(at::zeros({static_cast<int64_t>(ids_.size())}, cols.options())
                         .index_add(0, column_slot_[m].masked_select(ok), cols.masked_select(ok)));
    }
    capacity = r.capacity;
  }
  auto cat = [](std::vector<at::Tensor>& v) { return v.size() == 1 ? v[0] : at::cat(v, 0); };
  at::Tensor all_expert = cat(expert), all_keep = cat(keep);
  if (ctx.timers) ctx.timers->router += since(t0);
  t0 = Clock::now();
  DispatchPlan plan = dispatcher_.plan(all_expert, cat(gate), all_keep, cat(group), cat(position), capacity, M * G);
  if (ctx.expert_rows) ctx.expert_rows->push_back(plan.expert_counts);
  if (ctx.stats) {
    LayerStats s;
    const int64_t E = static_cast<int64_t>(ids_.size());
    at::Tensor chosen = all_expert.reshape({-1}).masked_select(cat(assigned_mask).reshape({-1}));
    at::Tensor assigned = at::bincount(chosen.to(at::kCPU), {}, E);
    s.assigned.assign(assigned.data_ptr<int64_t>(), assigned.data_ptr<int64_t>() + E);
    s.kept = plan.send_counts;
    at::Tensor sf = soft[0];
    for (size_t i = 1; i < soft.size(); ++i) sf = sf + soft[i];
    sf = sf.to(at::kCPU);
    s.soft.assign(sf.data_ptr<double>(), sf.data_ptr<double>() + E);
    s.tokens = ctx.image_valid.defined() ? M * T * ctx.image_valid.to(at::kBool).sum().item<int64_t>() : rows * T;
    (*ctx.stats)[layer_].add(s);
  }

  at::Tensor flat = x.reshape({rows * T, H});
  // Under autocast the experts compute in the autocast dtype anyway: cast before the
  // dispatch so that the permutes and the all-to-all move half the bytes.
  const auto dev = x.device().type();
  if (at::autocast::is_autocast_enabled(dev) && flat.scalar_type() == at::kFloat)
    flat = flat.to(at::autocast::get_autocast_dtype(dev));
  at::Tensor expert_in = dispatcher_.dispatch(flat, plan);
  if (ctx.timers) ctx.timers->dispatch += since(t0);
  t0 = Clock::now();
  at::Tensor expert_out = experts->forward(expert_in, plan.expert_counts);
  if (ctx.timers) ctx.timers->experts += since(t0);
  t0 = Clock::now();
  at::Tensor out = dispatcher_.combine(expert_out, plan).reshape({rows, T, H});
  if (ctx.timers) ctx.timers->combine += since(t0);
  return out;
}

}  // namespace moeprune
