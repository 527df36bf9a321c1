#include "train/optimizer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeprune {

double learning_rate(const PhaseConfig& p, int64_t step) {
  if (p.warmup_steps > 0 && step < p.warmup_steps) return p.lr * static_cast<double>(step + 1) / p.warmup_steps;
  const double span = std::max(1, p.steps - p.warmup_steps);
  const double t = std::min(1.0, static_cast<double>(step - p.warmup_steps) / span);
  return p.end_lr + 0.5 * (p.lr - p.end_lr) * (1.0 + std::cos(M_PI * t));
}

Optimizer::Optimizer(const PhaseConfig& cfg, std::vector<ParamSlot> params) : cfg_(cfg), slots_(std::move(params)) {}

namespace {
// Sums the gradients of the slots of one kind over comm: one flat all-reduce.
void sum_gradients(std::vector<ParamSlot>& slots, bool expert, Communicator& comm) {
  std::vector<at::Tensor> grads;
  for (auto& s : slots) {
    if (s.expert != expert) continue;
    if (!s.param.grad().defined()) s.param.mutable_grad() = at::zeros_like(s.param);
    grads.push_back(s.param.grad().reshape({-1}));
  }
  if (grads.empty() || comm.size() == 1) return;
  at::Tensor flat = at::cat(grads);
  comm.all_reduce(flat, ReduceOp::Sum);
  int64_t off = 0;
  for (auto& s : slots) {
    if (s.expert != expert) continue;
    const int64_t n = s.param.numel();
    s.param.mutable_grad().copy_(flat.narrow(0, off, n).view_as(s.param));
    off += n;
  }
}

// Sums the gradients of replicated experts over the ranks of an expert-parallel
// group (every rank takes part: a rank without a copy adds zeros), so that every
// copy gets the gradient of all the expert's tokens and the copies stay identical.
// One all-reduce of the replicated experts' rows; nothing when there are none.
void sum_replicas(std::vector<ParamSlot>& slots, Communicator& ep) {
  struct Row {
    ParamSlot* slot;
    int64_t row;  // in the slot's parameter, -1: not held here
  };
  std::vector<Row> rows;
  std::vector<at::Tensor> pieces;
  for (auto& s : slots) {
    if (!s.expert || s.replicated_ids.empty()) continue;
    if (!s.param.grad().defined()) s.param.mutable_grad() = at::zeros_like(s.param);
    const int64_t width = s.param.numel() / std::max<int64_t>(1, s.param.size(0));
    for (int id : s.replicated_ids) {
      const auto it = std::find(s.expert_ids.begin(), s.expert_ids.end(), id);
      const int64_t i = it == s.expert_ids.end() ? -1 : it - s.expert_ids.begin();
      rows.push_back({&s, i});
      pieces.push_back(i >= 0 ? s.param.grad()[i].reshape({-1}) : at::zeros({width}, s.param.grad().options()));
    }
  }
  if (pieces.empty() || ep.size() == 1) return;
  at::Tensor flat = at::cat(pieces);
  ep.all_reduce(flat, ReduceOp::Sum);
  int64_t off = 0;
  for (size_t j = 0; j < rows.size(); ++j) {
    const int64_t n = pieces[j].numel();
    if (rows[j].row >= 0) {
      at::Tensor g = rows[j].slot->param.mutable_grad()[rows[j].row];
      g.copy_(flat.narrow(0, off, n).view_as(g));
    }
    off += n;
  }
}

// The rows of an expert gradient that the norm counts on this rank.
// Sum of the squares of t's elements in double, in one pass over float32 data
// (a cast to double, a square and a sum were three passes through two
// double-sized temporaries: ~250 ms of a 1.1 s V-MoE S/32 step on 2 cores). The
// same value for any number of threads: fixed chunks, each summed in a fixed
// order, added in chunk order.
double sum_of_squares(const at::Tensor& t_in) {
  if (t_in.scalar_type() != at::kFloat) return t_in.to(at::kDouble).square().sum().item<double>();
  const at::Tensor t = t_in.contiguous();
  const float* x = t.data_ptr<float>();
  const int64_t n = t.numel();
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      double acc[4] = {0, 0, 0, 0};  // float squares are exact in double; four sums vectorise
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4)
        for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(x[i + u]) * static_cast<double>(x[i + u]);
      for (; i < hi; ++i) acc[0] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
      part[static_cast<size_t>(c)] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  });
  double sum = 0;
  for (double v : part) sum += v;
  return sum;
}

at::Tensor counted_rows(const ParamSlot& s) {
  return s.primary_rows.defined() ? s.param.grad().index_select(0, s.primary_rows) : s.param.grad();
}
}  // namespace

void Optimizer::sync_gradients(const Comms& comms, bool dense) {
  if (dense) sum_gradients(slots_, /*expert=*/false, *comms.device);
  sum_replicas(slots_, comms.ep());
  // An expert's gradient on one rank covers the tokens of its expert-parallel group;
  // its replicas in the other groups hold the rest.
  if (comms.edp_device) sum_gradients(slots_, /*expert=*/true, *comms.edp_device);
}

double Optimizer::grad_norm(Communicator& comm) {
  // Sums stay on the device until the end: one host sync per step, not one per
  // parameter (the same additions in the same order as a host accumulator).
  const auto opts = slots_.front().param.options().dtype(at::kDouble);
  at::Tensor dense = at::zeros({}, opts);
  at::Tensor expert = at::zeros({1}, opts);
  if (opts.device().is_cuda()) {
    // On GPUs one concatenation per kind: four launches per parameter (cast, square,
    // sum, add) were 2.3 ms of a V-MoE B/16 step on an H200. The sums differ from
    // the host loop's only by the order of double additions.
    std::vector<at::Tensor> d, e;
    for (auto& s : slots_)
      if (s.param.grad().defined()) (s.expert ? e : d).push_back((s.expert ? counted_rows(s) : s.param.grad()).reshape({-1}));
    if (!d.empty()) dense = at::cat(d).to(at::kDouble).square().sum();
    if (!e.empty()) expert = at::cat(e).to(at::kDouble).square().sum().reshape({1});
  } else {
    double d = 0, e = 0;
    for (auto& s : slots_) {
      if (!s.param.grad().defined()) continue;
      const double sq = sum_of_squares(s.expert ? counted_rows(s) : s.param.grad());
      (s.expert ? e : d) += sq;  // dense: identical on every rank after sync_gradients
    }
    dense.fill_(d);
    expert.fill_(e);
  }
  comm.all_reduce(expert, ReduceOp::Sum);
  return std::sqrt(dense.item<double>() + expert.item<double>());
}

double Optimizer::step(const Comms& comms, double lr) {
  at::NoGradGuard no_grad;
  // Each expert counted once: by the rank of its expert-parallel group that holds it
  // (its replicas in other groups hold the same gradient after sync_gradients).
  const double norm = grad_norm(comms.ep());
  // The same value on every rank (dense gradients synced, expert sums all-reduced).
  if (!std::isfinite(norm))
    throw DivergedError(concat("gradient norm is ", norm, " at optimiser step ", steps_ + 1,
                               ": stopped before this step changed the weights (nothing of it is saved); lower the "
                               "learning rate, check the data, or try precision fp32"));
  const double scale = (cfg_.clip_norm > 0 && norm > cfg_.clip_norm) ? cfg_.clip_norm / (norm + 1e-6) : 1.0;
  ++steps_;
  // Multi-tensor updates: on GPUs a few fused kernels per step instead of about eight
  // launches per parameter; on CPUs the same per-tensor operations as a plain loop.
  const bool adam = cfg_.optimizer != OptimizerKind::Sgd;
  const bool moments = adam || cfg_.momentum > 0;
  std::vector<at::Tensor> p, g, m1, m2;
  for (auto& s : slots_) {
    if (!s.param.grad().defined()) s.param.mutable_grad() = at::zeros_like(s.param);
    if (moments && !s.m1.defined()) s.m1 = at::zeros_like(s.param);
    if (adam && !s.m2.defined()) s.m2 = at::zeros_like(s.param);
    p.push_back(s.param);
    g.push_back(s.param.grad());
    if (moments) m1.push_back(s.m1);
    if (adam) m2.push_back(s.m2);
  }
  const bool fused = std::all_of(p.begin(), p.end(), [&](const at::Tensor& t) { return t.is_cpu(); }) &&
                     std::all_of(slots_.begin(), slots_.end(), [](const ParamSlot& s) {
                       const auto ok = [](const at::Tensor& t) {
                         return !t.defined() || (t.scalar_type() == at::kFloat && t.is_contiguous());
                       };
                       return ok(s.param) && ok(s.param.grad()) && ok(s.m1) && ok(s.m2);
                     });
  if (fused) {
    for (size_t i = 0; i < p.size(); ++i)
      update_fused(p[i], g[i], moments ? m1[i] : at::Tensor(), adam ? m2[i] : at::Tensor(), scale, lr);
    return norm;
  }
  if (scale != 1.0) g = at::_foreach_mul(g, scale);
  if (!adam) {
    if (cfg_.weight_decay > 0) g = at::_foreach_add(g, at::_foreach_mul(p, cfg_.weight_decay));
    if (cfg_.momentum > 0) {
      at::_foreach_mul_(m1, cfg_.momentum);
      at::_foreach_add_(m1, g);
      g = m1;
    }
    at::_foreach_add_(p, g, -lr);
  } else {
    at::_foreach_mul_(m1, cfg_.beta1);
    at::_foreach_add_(m1, g, 1 - cfg_.beta1);
    at::_foreach_mul_(m2, cfg_.beta2);
    at::_foreach_addcmul_(m2, g, g, 1 - cfg_.beta2);
    const double bc1 = 1 - std::pow(cfg_.beta1, static_cast<double>(steps_));
    const double bc2 = 1 - std::pow(cfg_.beta2, static_cast<double>(steps_));
    if (cfg_.weight_decay > 0) at::_foreach_mul_(p, 1 - lr * cfg_.weight_decay);
    std::vector<at::Tensor> denom = at::_foreach_div(m2, bc2);
    at::_foreach_sqrt_(denom);
    at::_foreach_add_(denom, cfg_.eps);
    at::_foreach_addcdiv_(p, m1, denom, -lr / bc1);
  }
  return norm;
}

void Optimizer::update_fused(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m1,
                             const at::Tensor& m2, double scale, double lr) const {
  // One pass per parameter over its value, gradient and moments, the arithmetic of
  // the multi-tensor path below (which makes a pass per operation), in float32. On a
  // V-MoE S/32 step on 2 cores the gradient norm and the update took ~380 ms before
  // (profiles: ~250 and ~130), 82 ms after.
  float* pv = param.data_ptr<float>();
  const float* gv = grad.data_ptr<float>();
  float* mv = m1.defined() ? m1.data_ptr<float>() : nullptr;
  float* vv = m2.defined() ? m2.data_ptr<float>() : nullptr;
  const auto sc = static_cast<float>(scale), wd = static_cast<float>(cfg_.weight_decay);
  const auto step_lr = static_cast<float>(lr);
  // Branch-free loops over restrict pointers, one per case: they vectorise.
  const auto for_chunks = [&](const auto& body) {
    at::parallel_for(0, param.numel(), 1 << 15, [&](int64_t i0, int64_t i1) {
      body(pv + i0, gv + i0, mv ? mv + i0 : nullptr, vv ? vv + i0 : nullptr, i1 - i0);
    });
  };
  if (cfg_.optimizer == OptimizerKind::Sgd) {
    const auto mu = static_cast<float>(cfg_.momentum);
    for_chunks([&](float* __restrict p, const float* __restrict g, float* __restrict m, float*, int64_t n) {
      if (m && wd > 0)
        for (int64_t i = 0; i < n; ++i) {
          m[i] = m[i] * mu + (g[i] * sc + p[i] * wd);
          p[i] -= step_lr * m[i];
        }
      else if (m)
        for (int64_t i = 0; i < n; ++i) {
          m[i] = m[i] * mu + g[i] * sc;
          p[i] -= step_lr * m[i];
        }
      else if (wd > 0)
        for (int64_t i = 0; i < n; ++i) p[i] -= step_lr * (g[i] * sc + p[i] * wd);
      else
        for (int64_t i = 0; i < n; ++i) p[i] -= step_lr * (g[i] * sc);
    });
    return;
  }
  const auto b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
  const auto bc1 = static_cast<float>(1 - std::pow(cfg_.beta1, static_cast<double>(steps_)));
  const auto bc2 = static_cast<float>(1 - std::pow(cfg_.beta2, static_cast<double>(steps_)));
  const auto decay = wd > 0 ? static_cast<float>(1 - lr * cfg_.weight_decay) : 1.0f;
  const auto eps = static_cast<float>(cfg_.eps);
  const float step_size = -step_lr / bc1;
  for_chunks([&](float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const float d = g[i] * sc;
      m[i] = m[i] * b1 + d * (1 - b1);
      v[i] = v[i] * b2 + d * d * (1 - b2);
      p[i] = p[i] * decay + step_size * (m[i] / (std::sqrt(v[i] / bc2) + eps));
    }
  });
}

void Optimizer::save_state(StateWriter& out) const {
  for (const auto& s : slots_) {
    for (const auto& [key, m] : {std::pair{"optim.m1.", &s.m1}, std::pair{"optim.m2.", &s.m2}}) {
      if (!m->defined()) continue;
      const std::string name = key + s.name;
      if (!s.expert) {
        out.replicated(name, *m);
        continue;
      }
      for (size_t i = 0; i < s.expert_ids.size(); ++i)
        if (s.primary.empty() || s.primary[i]) out.expert(name, s.block, s.expert_ids[i], (*m)[static_cast<int64_t>(i)]);
    }
  }
  out.meta()["kind"] = name_of(cfg_.optimizer);
  out.meta()["steps"] = steps_;
}

void Optimizer::load_state(const StateReader& in) {
  std::string kind, what = concat("checkpoint ", in.where(), ": optimizer");
  try {
    kind = in.meta().at("kind").get<std::string>();
    steps_ = in.meta().at("steps").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(concat(what, " state lacks a field or has a wrong type: ", e.what()));
  }
  require(parse_choice<OptimizerKind>(kind, what) == cfg_.optimizer,
          concat(what, " state is of ", kind, ", this phase uses ", name_of(cfg_.optimizer)));
  for (auto& s : slots_) {
    const at::Tensor& p = s.param;
    for (const auto& [key, m] : {std::pair{"optim.m1.", &s.m1}, std::pair{"optim.m2.", &s.m2}}) {
      const std::string name = key + s.name;
      if (!s.expert) {
        if (in.has_replicated(name)) *m = in.replicated(name, p.sizes()).clone().to(p.device());
        continue;
      }
      for (size_t i = 0; i < s.expert_ids.size(); ++i) {
        if (!in.has_expert(name, s.block, s.expert_ids[i])) continue;
        if (!m->defined()) *m = at::zeros_like(p);
        (*m)[static_cast<int64_t>(i)].copy_(in.expert(name, s.block, s.expert_ids[i], p.sizes().slice(1)));
      }
    }
  }
}

void Optimizer::zero_grad() {
  // Undefined, not zero-filled: the step's first backward then stores each gradient
  // as it comes (AccumulateGrad takes the tensor) instead of adding it to zeros, which
  // saves a fill and a read-modify-write pass over every gradient per step; 0 + g = g,
  // so the bits are the same. Parameters that get no gradient are given zeros where
  // the step reads them (sync, norm, update).
  for (auto& s : slots_) s.param.mutable_grad().reset();
}

}  // namespace moeprune
