#include "model/router.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "core/precision.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace moeprune {

int64_t expert_capacity(int64_t group_tokens, int top_k, double capacity_factor, int num_experts) {
  auto c = static_cast<int64_t>(std::ceil(static_cast<double>(group_tokens) * top_k * capacity_factor / num_experts));
  c = std::max<int64_t>(c, 1);
  return (c + 3) / 4 * 4;
}

at::Tensor priority_order(const at::Tensor& top_gate, bool bpr, const at::Tensor& token_valid) {
  const int64_t G = top_gate.size(0), S = top_gate.size(1);
  if (!bpr) return at::arange(S, top_gate.options().dtype(at::kLong)).unsqueeze(0).expand({G, S});
  at::Tensor key = top_gate.select(2, 0).detach();
  if (token_valid.defined()) key = key.masked_fill(token_valid.logical_not(), -1.0);  // gates are >= 0
  return std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/1, /*descending=*/true));
}

std::pair<at::Tensor, at::Tensor> assign_slots(const at::Tensor& top_expert, const at::Tensor& top_gate,
                                               int num_experts, int64_t capacity, bool bpr,
                                               const at::Tensor& token_valid) {
  const int64_t G = top_expert.size(0), S = top_expert.size(1), K = top_expert.size(2);
  const at::Tensor order = priority_order(top_gate, bpr, token_valid);  // [G, S]: the i-th token in priority order
  at::Tensor sorted = top_expert.gather(1, order.unsqueeze(2).expand({G, S, K}));  // [G, S, K]
  // Choice-major: all top-1 choices of the group, then all top-2 choices, ...
  at::Tensor flat = sorted.transpose(1, 2).reshape({G, K * S});
  at::Tensor onehot = at::one_hot(flat, num_experts);                 // [G, K*S, E]
  if (token_valid.defined()) {  // invalid tokens count for no expert
    at::Tensor v = token_valid.gather(1, order).unsqueeze(1).expand({G, K, S}).reshape({G, K * S, 1});
    onehot = onehot * v.to(onehot.scalar_type());
  }
  at::Tensor pos = (onehot.cumsum(1) * onehot).sum(2) - 1;            // [G, K*S], -1 for invalid tokens
  pos = pos.reshape({G, K, S}).transpose(1, 2);                       // [G, S, K] in priority order
  at::Tensor position = at::empty_like(pos);
  position.scatter_(1, order.unsqueeze(2).expand({G, S, K}), pos);    // back to token order
  return {position, position.ge(0).logical_and(position < capacity)};
}

Selection TorchSelector::select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                                const at::Tensor& token_valid) const {
  Selection s;
  std::tie(s.gate, s.expert) = probs.topk(k, -1);  // [G, S, k]
  std::tie(s.position, s.keep) = assign_slots(s.expert, s.gate, static_cast<int>(probs.size(-1)), capacity, bpr,
                                              token_valid);
  return s;
}

at::Tensor importance_loss(const at::Tensor& probs) {
  at::Tensor importance = probs.sum(1);  // [G, E]
  at::Tensor cv = importance.std(1, /*unbiased=*/false) / importance.mean(1);
  return cv.pow(2).sum();
}

at::Tensor load_loss(const at::Tensor& logits, const at::Tensor& noisy_logits, double noise_std, int top_k) {
  // The threshold an expert must beat is the k-th largest noisy logit of the token;
  // re-drawing that expert's noise, it wins with probability 1 - Phi((t - l) / std).
  at::Tensor kth = std::get<0>(noisy_logits.topk(top_k, -1)).select(-1, top_k - 1).unsqueeze(-1);
  at::Tensor z = (kth - logits) / noise_std;
  at::Tensor p = 1.0 - 0.5 * at::erfc(-z / std::sqrt(2.0));  // 1 - Phi(z)
  at::Tensor p_mean = p.mean(1);                                // [G, E]
  at::Tensor cv = p_mean.std(1, /*unbiased=*/false) / p_mean.mean(1);
  return cv.pow(2).sum();
}

RouterImpl::RouterImpl(int hidden, RouterOptions opts) : opts_(opts) {
  // vmoe's router is a flax Dense with its default kernel init, lecun_normal: std 1/sqrt(fan_in).
  const double init_std = opts.init_std > 0 ? opts.init_std : 1.0 / std::sqrt(static_cast<double>(hidden));
  weight = register_parameter("weight", at::randn({hidden, opts.num_experts}) * init_std);
}

Routing RouterImpl::forward(const at::Tensor& x, bool train, const std::vector<uint64_t>& noise_seeds,
                            const SlotSelector& selector, int top_k, const at::Tensor& token_valid,
                            const at::Tensor& column_keep) {
  const int k = top_k > 0 ? std::min(top_k, opts_.top_k) : opts_.top_k;
  const int64_t G = x.size(0), S = x.size(1);
  const int E = opts_.num_experts;
  // Columns that take part: all, or those column_keep leaves (capacity as for a router of that many).
  const int E_live = column_keep.defined() ? static_cast<int>(column_keep.sum().item<int64_t>()) : E;
  TORCH_CHECK(E_live >= k, "router: ", E_live, " unmasked columns for top-", k);
  Routing r;
  r.num_groups = G;
  r.group_tokens = S;
  r.capacity = expert_capacity(S, k, opts_.capacity_factor, E_live);

  // Routing in float32 also inside a bf16 autocast region: decisions, gates and
  // auxiliary losses must not depend on bf16 rounding of the logits.
  NoAutocastGuard fp32_router(x.device().type());
  at::Tensor logits = at::matmul(x.to(at::kFloat), weight);  // [G, S, E]
  if (column_keep.defined())
    logits = logits.masked_fill(column_keep.logical_not(), -std::numeric_limits<float>::infinity());
  at::Tensor noisy = logits;
  const double std_noise = opts_.noise_std / E;
  const bool noisy_routing = train && std_noise > 0;
  if (noisy_routing) {
    TORCH_CHECK(static_cast<int64_t>(noise_seeds.size()) == G, "router: need one noise seed per group");
    // One host buffer (pinned when it goes to a GPU, so that the copy does not stall
    // the host), each group's block drawn from its own generator exactly as
    // randn({S, E}, gen) would, then one copy. The groups are drawn in parallel on the
    // intra-op threads: each has its own generator, so the noise does not depend on the
    // thread count. (Serial, it was ~4 ns of host time per normal: 0.39 ms per layer
    // forward of V-MoE B/16 at 64 images, growing with tokens x experts.)
    const bool to_gpu = logits.is_cuda();
    at::Tensor noise = at::empty({G, S, E}, at::TensorOptions().dtype(at::kFloat).pinned_memory(to_gpu));
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(noise_seeds[g]);
        noise[g].normal_(0.0, 1.0, gen);
      }
    });
    noisy = logits + noise.to(logits.device(), /*non_blocking=*/to_gpu) * std_noise;
  }
  at::Tensor probs = at::softmax(noisy, -1);
  const Selection sel = selector.select(probs, k, r.capacity, opts_.bpr, token_valid);

  r.importance_loss = importance_loss(probs);
  r.load_loss = noisy_routing ? load_loss(logits, noisy, std_noise, k) : at::zeros({}, logits.options());
  r.entropy = -(probs * at::log(probs.clamp_min(1e-12))).sum(-1).mean(1).sum();
  r.expert = sel.expert.reshape({G * S, k});
  r.gate = sel.gate.reshape({G * S, k});
  r.position = sel.position.reshape({G * S, k});
  r.keep = sel.keep.reshape({G * S, k});
  r.probs = probs.reshape({G * S, E});
  return r;
}

}  // namespace moeprune
