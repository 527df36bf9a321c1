#include "train/optimizer.h"

#include <cmath>

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
    if (cfg_.optimizer == "sgd") {
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

void Optimizer::zero_grad() {
  for (auto& s : slots_)
    if (s.param.grad().defined()) s.param.mutable_grad().zero_();
}

}  // namespace moeprune
