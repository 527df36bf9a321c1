#include "model/moe_layer.h"

#include <ATen/autocast_mode.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <optional>

#include "core/error.h"
#include "core/log.h"
#include "model/direct_exchange.h"
#include "model/expert_bank.h"
#include "model/trace_range.h"

namespace moeprune {

MoeLayerImpl::MoeLayerImpl(const ModelConfig& cfg, int layer, Placement placement, Communicator& comm,
                           uint64_t seed, MoeRuntime runtime)
    : cfg_(cfg), layer_(layer), ids_(cfg.layer_experts(layer)), placement_(std::move(placement)), comm_(&comm),
      runtime_(runtime) {
  const MoeConfig& m = cfg.moe;
  const int E_l = static_cast<int>(ids_.size());
  require(placement_.num_experts() == E_l,
          concat("MoE layer ", layer, ": placement has ", placement_.num_experts(), " experts, the layer has ", E_l));
  require(placement_.world_size() == comm.size(),
          concat("MoE layer ", layer, ": placement is for ", placement_.world_size(), " ranks, the job has ",
                 comm.size()));
  const bool pruned = E_l < m.num_experts;
  const bool drop = !pruned || cfg.pruned_routing == PrunedRouting::Drop;
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
    RouterOptions ro{static_cast<int>(col_slot.size()), m.top_k, m.capacity_factor, m.noise_std, m.bpr, m.router_init_std};
    routers->push_back(Router(cfg.hidden, ro));
    column_slot_.push_back(register_buffer(concat("column_slot_", mem), at::tensor(col_slot, at::kLong)));
  }
  std::vector<int> local;
  for (int s2 : placement_.local_experts(comm.rank())) local.push_back(ids_[static_cast<size_t>(s2)]);
  experts = register_module("experts",
                            ExpertBank(cfg.hidden, cfg.mlp_dim, local, layer, seed, runtime_.expert_gemm));
}

std::vector<bool> MoeLayerImpl::primary_copies() const {
  std::vector<bool> out;
  for (int e : placement_.local_experts(comm_->rank())) out.push_back(placement_.rank_of(e) == comm_->rank());
  return out;
}

int MoeLayerImpl::routed_experts(int member) const {
  return static_cast<int>((column_slot_.at(member) >= 0).sum().item<int64_t>());
}

void MoeLayerImpl::set_runtime(const MoeRuntime& rt) {
  runtime_ = rt;
  experts->set_gemm(rt.expert_gemm);
  dispatcher_.reset();
}

void MoeLayerImpl::set_expert_mask(const std::vector<int>* kept_ids, PrunedRouting routing) {
  mask_keep_.clear();
  if (!kept_ids) return;
  for (int id : *kept_ids)
    require(std::binary_search(ids_.begin(), ids_.end(), id),
            concat("MoE layer ", layer_, ": mask keeps expert ", id, ", which the layer does not have"));
  mask_columns_ = routing == PrunedRouting::Drop;
  for (const auto& cols : column_ids_) {
    std::vector<uint8_t> keep;
    for (int id : cols) keep.push_back(std::find(kept_ids->begin(), kept_ids->end(), id) != kept_ids->end());
    mask_keep_.push_back(at::tensor(at::ArrayRef<uint8_t>(keep), at::kByte).to(at::kBool));
  }
}

TokenDispatcher& MoeLayerImpl::dispatcher(c10::Device device) {
  if (!dispatcher_ || dispatcher_device_ != device) {
    dispatcher_ = make_dispatcher(runtime_.dispatcher, device, *comm_, placement_.copies());
    dispatcher_device_ = device;
  }
  return *dispatcher_;
}

namespace {
using Clock = std::chrono::steady_clock;

// Adds the wall time since the previous lap to one field of the timers, when there are timers.
class Laps {
 public:
  explicit Laps(MoeTimers* timers) : timers_(timers), last_(Clock::now()) {}
  void lap(double MoeTimers::*field) {
    if (!timers_) return;
    const auto now = Clock::now();
    timers_->*field += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  MoeTimers* timers_;
  Clock::time_point last_;
};

at::Tensor cat_rows(const std::vector<at::Tensor>& v) { return v.size() == 1 ? v[0] : at::cat(v, 0); }
}  // namespace

// The sizes of one call: M members, B images per member, T tokens, H hidden, G groups of gs images.
struct MoeLayerImpl::Shape {
  int M;
  int64_t rows, B, T, H, gs, G;
  at::Tensor token_valid;   // [G, gs*T] bool, or undefined: padding images are not routed
  at::Tensor choice_valid;  // [G*gs*T, 1] bool, or undefined
};

// What the routers of all members decided, ready for the dispatcher: choices in
// copy slots (layer slots when no expert has replicas).
struct MoeLayerImpl::Routed {
  RoutedChoices choices;
  at::Tensor slot;     // [N, k] int64: layer slot of each choice (statistics)
  at::Tensor counted;  // [N, k] bool: choices of valid tokens for surviving experts (statistics)
  at::Tensor soft;     // [E_l] double: router probability mass per slot (statistics)
};

MoeLayerImpl::Routed MoeLayerImpl::route(const at::Tensor& x, const Shape& s, const SlotSelector& selector,
                                         ForwardContext& ctx) {
  const ForwardInputs& in = ctx.in;
  const bool stats = ctx.probes.stats != nullptr;
  std::vector<at::Tensor> expert, layer_slot, gate, keep, group, position, soft, counted;
  Routed out;
  const bool replicas = placement_.has_replicas();
  if (replicas && (!first_copy_.defined() || first_copy_.device() != x.device())) {
    std::vector<int64_t> first, count;
    for (int e = 0; e < placement_.num_experts(); ++e) {
      first.push_back(placement_.first_copy(e));
      count.push_back(placement_.replicas(e));
    }
    first_copy_ = at::tensor(first, at::kLong).to(x.device());
    replicas_ = at::tensor(count, at::kLong).to(x.device());
  }
  for (int m = 0; m < s.M; ++m) {
    at::Tensor xm = x.narrow(0, m * s.B, s.B).reshape({s.G, s.gs * s.T, s.H});
    std::vector<uint64_t> seeds(s.G);
    for (int64_t g = 0; g < s.G; ++g)
      seeds[g] = expert_seed(in.noise_seed, layer_, static_cast<int>((m * in.total_groups + in.first_group + g)));
    at::Tensor keep_col = mask_keep_.empty() ? at::Tensor() : mask_keep_[m].to(x.device());
    Routing r = routers[m]->as<RouterImpl>()->forward(xm, in.train, seeds, selector, in.top_k, s.token_valid,
                                                      mask_columns_ ? keep_col : at::Tensor());
    const double wi = cfg_.moe.importance_loss_weight, wl = cfg_.moe.load_loss_weight;
    at::Tensor aux = r.importance_loss * wi + r.load_loss * wl;
    if (in.entropy_weight > 0) aux = aux + r.entropy * in.entropy_weight;
    ctx.aux_loss = ctx.aux_loss.defined() ? ctx.aux_loss + aux : aux;
    // Router columns -> layer slots; a choice of a pruned expert (zero routing) is
    // dropped: it contributes nothing and costs nothing.
    at::Tensor slot = column_slot_[m].index_select(0, r.expert.reshape({-1})).view_as(r.expert);
    at::Tensor alive = slot >= 0;
    if (keep_col.defined()) alive = alive.logical_and(keep_col.index_select(0, r.expert.reshape({-1})).view_as(r.expert));
    slot = slot.clamp_min(0);
    layer_slot.push_back(slot);
    gate.push_back(r.gate);
    keep.push_back(r.keep.logical_and(alive));
    // Groups of member m follow those of members < m in the dispatch order.
    const auto per_token = [&](int64_t first) {
      return (at::arange(s.G, r.expert.options()) + first).repeat_interleave(s.gs * s.T).unsqueeze(1).expand_as(
          r.expert);
    };
    group.push_back(per_token(m * s.G));
    position.push_back(r.position);
    if (replicas) {
      // A replicated expert's choices are split among its copies by their global
      // routing group and capacity slot only: the copies hold the same weights, so
      // the outputs do not depend on the split (invariant 2), and the split does not
      // depend on the placement of the other experts.
      const at::Tensor spread = per_token(m * in.total_groups + in.first_group) + r.position.clamp_min(0);
      expert.push_back(first_copy_.index_select(0, slot.reshape({-1})).view_as(slot) +
                       spread.remainder(replicas_.index_select(0, slot.reshape({-1})).view_as(slot)));
    } else {
      expert.push_back(slot);
    }
    // The largest member's capacity (E3 members pruned unevenly differ): it bounds
    // every kept choice's position, which the dispatcher's sort key relies on.
    out.choices.capacity = std::max(out.choices.capacity, r.capacity);
    if (!stats) continue;
    counted.push_back(s.choice_valid.defined() ? alive.logical_and(s.choice_valid) : alive);
    at::Tensor pr = r.probs.detach();
    if (s.choice_valid.defined()) pr = pr * s.choice_valid.to(pr.scalar_type());
    at::Tensor cols = pr.sum(0).to(at::kDouble);
    at::Tensor ok = column_slot_[m] >= 0;
    soft.push_back(at::zeros({static_cast<int64_t>(ids_.size())}, cols.options())
                       .index_add(0, column_slot_[m].masked_select(ok), cols.masked_select(ok)));
  }
  out.choices.expert = cat_rows(expert);
  out.choices.gate = cat_rows(gate);
  out.choices.keep = cat_rows(keep);
  out.choices.group = cat_rows(group);
  out.choices.position = cat_rows(position);
  out.choices.num_groups = s.M * s.G;
  out.slot = replicas ? cat_rows(layer_slot) : out.choices.expert;
  if (stats) {
    out.counted = cat_rows(counted);
    out.soft = soft[0];
    for (size_t i = 1; i < soft.size(); ++i) out.soft = out.soft + soft[i];
  }
  return out;
}

void MoeLayerImpl::record(const Routed& r, const DispatchPlan& plan, const Shape& s, ForwardContext& ctx) const {
  if (ctx.probes.expert_rows) ctx.probes.expert_rows->push_back(plan.expert_counts);
  if (!ctx.probes.stats) return;
  LayerStats st;
  const int64_t E = static_cast<int64_t>(ids_.size());
  at::Tensor chosen = r.slot.reshape({-1}).masked_select(r.counted.reshape({-1}));
  at::Tensor assigned = at::bincount(chosen.to(at::kCPU), {}, E);
  st.assigned.assign(assigned.data_ptr<int64_t>(), assigned.data_ptr<int64_t>() + E);
  st.kept.assign(static_cast<size_t>(E), 0);  // plan counts are per copy slot
  for (size_t c = 0; c < plan.send_counts.size(); ++c)
    st.kept[static_cast<size_t>(placement_.copy_expert(static_cast<int>(c)))] += plan.send_counts[c];
  at::Tensor sf = r.soft.to(at::kCPU);
  st.soft.assign(sf.data_ptr<double>(), sf.data_ptr<double>() + E);
  st.tokens = ctx.in.image_valid.defined() ? s.M * s.T * ctx.in.image_valid.to(at::kBool).sum().item<int64_t>()
                                           : s.rows * s.T;
  (*ctx.probes.stats)[layer_].add(st);
}

bool MoeLayerImpl::pipelined_here(const at::Tensor& flat, const TokenDispatcher& d, const DispatchPlan& plan) const {
  std::string why;
  if (!flat.is_cpu()) why = "on GPUs the exchange is not chunked yet";
  else if (d.name() != "kernels") why = "runtime.dispatcher is torch";
  else if (const ExpertGemm g = experts->resolved_gemm(flat); g != ExpertGemm::Loop)
    why = concat("the experts are not computed one by one (runtime.expert_gemm resolves to ", str(g), " here)");
  else if (comm_->size() == 1) why = "one rank has nothing to exchange";
  else if (!pipelines(plan, *comm_, runtime_.dispatch_chunks)) why = "more than 4095 experts on one rank";
  if (why.empty()) return true;
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    log::warn(concat("runtime.dispatch_chunks=", runtime_.dispatch_chunks, " is ignored: ", why,
                     " (it applies to the CPU path over MPI with the loop of experts)"));
  return false;
}

int64_t MoeLayerImpl::rows_bound(const DispatchPlan& plan, const at::Tensor& expert_in) {
  if (experts->resolved_gemm(expert_in) != ExpertGemm::Batched) return 0;
  // The most rows any copy of the layer's experts got, over the expert-parallel
  // group: the same whichever rank holds which expert (one all-reduce of one integer).
  int64_t most = 0;
  for (int64_t n : plan.expert_counts) most = std::max(most, n);
  at::Tensor t = at::full({1}, most, at::kLong).to(expert_in.device());
  comm_->all_reduce(t, ReduceOp::Max);
  return t.item<int64_t>();
}

at::Tensor MoeLayerImpl::forward(const at::Tensor& x, ForwardContext& ctx) {
  Shape s;
  s.M = cfg_.moe.ensemble_size;
  s.rows = x.size(0), s.T = x.size(1), s.H = x.size(2);
  TORCH_CHECK(s.rows % s.M == 0, "MoE layer: batch rows not divisible by ensemble size");
  s.B = s.rows / s.M;
  s.gs = cfg_.moe.group_size;
  TORCH_CHECK(s.B % s.gs == 0, "MoE layer: ", s.B, " images per member is not a multiple of group_size ", s.gs);
  s.G = s.B / s.gs;
  if (const at::Tensor& valid = ctx.in.image_valid; valid.defined()) {
    TORCH_CHECK(valid.numel() == s.B, "MoE layer: image_valid has ", valid.numel(), " entries for ", s.B, " images");
    s.token_valid = valid.to(x.device()).to(at::kBool).view({s.G, s.gs}).repeat_interleave(s.T, 1);
    s.choice_valid = s.token_valid.reshape({-1, 1});
  }
  TokenDispatcher& d = dispatcher(x.device());
  Laps laps(ctx.probes.timers);

  TraceRange range("moe::route");
  const Routed routed = route(x, s, d, ctx);
  laps.lap(&MoeTimers::router);

  range.next("moe::plan");
  const std::unique_ptr<DispatchPlan> plan = d.plan(routed.choices);
  record(routed, *plan, s, ctx);
  at::Tensor flat = x.reshape({s.rows * s.T, s.H});
  // Under autocast the experts compute in the autocast dtype anyway: cast before the
  // dispatch so that the permutes and the all-to-all move half the bytes.
  const auto dev = x.device().type();
  if (at::autocast::is_autocast_enabled(dev) && flat.scalar_type() == at::kFloat)
    flat = flat.to(at::autocast::get_autocast_dtype(dev));
  if (runtime_.dispatch_chunks > 1 && pipelined_here(flat, d, *plan)) {
    // Dispatch, experts and combine overlapped (identical results): one phase for the timers.
    range.next("moe::pipelined");
    at::Tensor out = pipelined_moe(flat, *plan, *comm_, runtime_.dispatch_chunks,
                                   [&](const at::Tensor& in, const ExpertHooksPtr& hooks) {
                                     return experts->forward(in, plan->expert_counts, 0, hooks);
                                   });
    range.end();
    laps.lap(&MoeTimers::experts);
    if (ctx.probes.timers) ++ctx.probes.timers->pipelined;
    return out.reshape({s.rows, s.T, s.H});
  }
  range.next("moe::dispatch");
  at::Tensor expert_in = d.dispatch(flat, *plan);
  laps.lap(&MoeTimers::dispatch);

  range.next("moe::experts");
  at::Tensor expert_out =
      experts->forward(expert_in, plan->expert_counts, rows_bound(*plan, expert_in), {}, d.output_alloc(expert_in));
  laps.lap(&MoeTimers::experts);

  range.next("moe::combine");
  at::Tensor out = d.combine(expert_out, *plan).reshape({s.rows, s.T, s.H});
  range.end();
  laps.lap(&MoeTimers::combine);
  return out;
}

}  // namespace moeprune
