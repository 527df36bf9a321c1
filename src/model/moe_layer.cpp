#include "model/moe_layer.h"

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

at::Tensor MoeLayerImpl::forward(const at::Tensor& x, ForwardContext& ctx) {
  const int M = cfg_.moe.ensemble_size;
  const int64_t rows = x.size(0), T = x.size(1), H = x.size(2);
  TORCH_CHECK(rows % M == 0, "MoE layer: batch rows not divisible by ensemble size");
  const int64_t B = rows / M;
  const int64_t gs = cfg_.moe.group_size;
  TORCH_CHECK(B % gs == 0, "MoE layer: ", B, " images per member is not a multiple of group_size ", gs);
  const int64_t G = B / gs;
  const int experts_per_member = cfg_.moe.num_experts / M;

  std::vector<at::Tensor> expert, gate, keep, group, position;
  int64_t capacity = 0;
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
    capacity = r.capacity;
  }
  auto cat = [](std::vector<at::Tensor>& v) { return v.size() == 1 ? v[0] : at::cat(v, 0); };
  DispatchPlan plan = dispatcher_.plan(cat(expert), cat(gate), cat(keep), cat(group), cat(position), capacity, M * G);
  if (ctx.routed_counts) ctx.routed_counts->push_back(plan.send_counts);
  if (ctx.expert_rows) ctx.expert_rows->push_back(plan.expert_counts);

  at::Tensor flat = x.reshape({rows * T, H});
  at::Tensor expert_in = dispatcher_.dispatch(flat, plan);
  at::Tensor expert_out = experts->forward(expert_in, plan.expert_counts);
  return dispatcher_.combine(expert_out, plan).reshape({rows, T, H});
}

}  // namespace moeprune
