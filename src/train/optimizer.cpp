#include "train/optimizer.h"

#include <cmath>
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

void Optimizer::sync_gradients(Communicator& comm) {
  std::vector<at::Tensor> grads;
  for (auto& s : slots_) {
    if (s.expert) continue;
    if (!s.param.grad().defined()) s.param.mutable_grad() = at::zeros_like(s.param);
    grads.push_back(s.param.grad().reshape({-1}));
  }
  if (grads.empty() || comm.size() == 1) return;
  at::Tensor flat = at::cat(grads);
  comm.all_reduce(flat, ReduceOp::Sum);
  int64_t off = 0;
  for (auto& s : slots_) {
    if (s.expert) continue;
    const int64_t n = s.param.numel();
    s.param.mutable_grad().copy_(flat.narrow(0, off, n).view_as(s.param));
    off += n;
  }
}

double Optimizer::grad_norm(Communicator& comm) {
  double dense = 0;
  at::Tensor expert = at::zeros({1}, slots_.front().param.options().dtype(at::kDouble));
  for (auto& s : slots_) {
    if (!s.param.grad().defined()) continue;
    at::Tensor sq = s.param.grad().to(at::kDouble).pow(2).sum();
    if (s.expert) expert += sq;
    else dense += sq.item<double>();  // identical on every rank after sync_gradients
  }
  comm.all_reduce(expert, ReduceOp::Sum);
  return std::sqrt(dense + expert.item<double>());
}

double Optimizer::step(Communicator& comm, double lr) {
  at::NoGradGuard no_grad;
  const double norm = grad_norm(comm);
  const double scale = (cfg_.clip_norm > 0 && norm > cfg_.clip_norm) ? cfg_.clip_norm / (norm + 1e-6) : 1.0;
  ++steps_;
  for (auto& s : slots_) {
    if (!s.param.grad().defined()) s.param.mutable_grad() = at::zeros_like(s.param);
    at::Tensor g = s.param.grad();
    if (scale != 1.0) g = g * scale;
    if (cfg_.optimizer == OptimizerKind::Sgd) {
      if (cfg_.weight_decay > 0) g = g + s.param * cfg_.weight_decay;
      if (cfg_.momentum > 0) {
        if (!s.m1.defined()) s.m1 = at::zeros_like(s.param);
        s.m1.mul_(cfg_.momentum).add_(g);
        g = s.m1;
      }
      s.param.add_(g, -lr);
    } else {  // adamw
      if (!s.m1.defined()) {
        s.m1 = at::zeros_like(s.param);
        s.m2 = at::zeros_like(s.param);
      }
      s.m1.mul_(cfg_.beta1).add_(g, 1 - cfg_.beta1);
      s.m2.mul_(cfg_.beta2).addcmul_(g, g, 1 - cfg_.beta2);
      const double bc1 = 1 - std::pow(cfg_.beta1, static_cast<double>(steps_));
      const double bc2 = 1 - std::pow(cfg_.beta2, static_cast<double>(steps_));
      if (cfg_.weight_decay > 0) s.param.mul_(1 - lr * cfg_.weight_decay);
      s.param.addcdiv_(s.m1, (s.m2 / bc2).sqrt_().add_(cfg_.eps), -lr / bc1);
    }
  }
  return norm;
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
        out.expert(name, s.block, s.expert_ids[i], (*m)[static_cast<int64_t>(i)]);
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
  for (auto& s : slots_)
    if (s.param.grad().defined()) s.param.mutable_grad().zero_();
}

}  // namespace moeprune
