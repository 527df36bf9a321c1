#include "model/moe_layer.h"

#include <chrono>

#include "core/error.h"
#include "model/expert_bank.h"

namespace moeprune {

MoeLayerImpl::MoeLayerImpl(const ModelConfig& cfg, int layer, Placement placement, Communicator& comm,
                           uint64_t seed)
    : cfg_(cfg), layer_(layer), placement_(std::move(placement)), dispatcher_(comm, placement_) {
  const MoeConfig& m = cfg.moe;
  require(placement_.num_experts() == m.num_experts,
          concat("MoE layer ", layer, ": placement has ", placement_.num_experts(), " experts, config has ",
              m.num_experts));
  require(placement_.world_size() == comm.size(),
          concat("MoE layer ", layer, ": placement is for ", placement_.world_size(), " ranks, the job has ",
              comm.size()));
  routers = register_module("routers", torch::nn::ModuleList());
  RouterOptions ro{m.num_experts / m.ensemble_size, m.top_k, m.capacity_factor, m.noise_std, m.bpr};
  for (int i = 0; i < m.ensemble_size; ++i) routers->push_back(Router(cfg.hidden, ro));
  experts = register_module(
      "experts", ExpertBank(cfg.hidden, cfg.mlp_dim, placement_.local_experts(comm.rank()), layer, seed));
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
  const int experts_per_member = cfg_.moe.num_experts / M;

  std::vector<at::Tensor> expert, gate, keep, group, position, soft;
  int64_t capacity = 0;
  auto t0 = Clock::now();
  for (int m = 0; m < M; ++m) {
    at::Tensor xm = x.narrow(0, m * B, B).reshape({G, gs * T, H});
    std::vector<uint64_t> seeds(G);
    for (int64_t g = 0; g < G; ++g)
      seeds[g] = expert_seed(ctx.noise_seed, layer_, static_cast<int>((m * ctx.total_groups + ctx.first_group + g)));
    Routing r = routers[m]->as<RouterImpl>()->forward(xm, ctx.train, seeds);
    const double wi = cfg_.moe.importance_loss_weight, wl = cfg_.moe.load_loss_weight;
    at::Tensor aux = r.importance_loss * wi + r.load_loss * wl;
    ctx.aux_loss = ctx.aux_loss.defined() ? ctx.aux_loss + aux : aux;
    expert.push_back(r.expert + m * experts_per_member);
    gate.push_back(r.gate);
    keep.push_back(r.keep);
    // Groups of member m follow those of members < m in the dispatch order.
    group.push_back((at::arange(G, r.expert.options()) + m * G).repeat_interleave(gs * T).unsqueeze(1).expand_as(r.expert));
    position.push_back(r.position);
    if (ctx.stats) soft.push_back(r.probs.detach().sum(0).to(at::kDouble));
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
    const int E = cfg_.moe.num_experts;
    at::Tensor assigned = at::bincount(all_expert.reshape({-1}).to(at::kCPU), {}, E);
    s.assigned.assign(assigned.data_ptr<int64_t>(), assigned.data_ptr<int64_t>() + E);
    s.kept = plan.send_counts;
    at::Tensor sf = at::cat(soft).to(at::kCPU);  // member m's experts follow member m-1's
    s.soft.assign(sf.data_ptr<double>(), sf.data_ptr<double>() + E);
    s.tokens = rows * T;
    (*ctx.stats)[layer_].add(s);
  }

  at::Tensor flat = x.reshape({rows * T, H});
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
