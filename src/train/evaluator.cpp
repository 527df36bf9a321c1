#include "train/evaluator.h"

namespace moeprune {

void all_reduce_stats(std::map<int, LayerStats>& stats, Communicator& host) {
  for (auto& [layer, s] : stats) {
    const int64_t E = static_cast<int64_t>(s.assigned.size());
    at::Tensor t = at::empty({3 * E + 1}, at::kDouble);
    for (int64_t e = 0; e < E; ++e) {
      t[e] = static_cast<double>(s.assigned[e]);
      t[E + e] = static_cast<double>(s.kept[e]);
      t[2 * E + e] = s.soft[e];
    }
    t[3 * E] = static_cast<double>(s.tokens);
    host.all_reduce(t, ReduceOp::Sum);
    for (int64_t e = 0; e < E; ++e) {
      s.assigned[e] = static_cast<int64_t>(t[e].item<double>());
      s.kept[e] = static_cast<int64_t>(t[E + e].item<double>());
      s.soft[e] = t[2 * E + e].item<double>();
    }
    s.tokens = static_cast<int64_t>(t[3 * E].item<double>());
  }
}

EvalResult evaluate(VisionTransformer& model, ShardedLoader& loader, Comms comms, int64_t max_batches, int top_k) {
  TORCH_CHECK(!loader.options().train, "evaluate needs an evaluation loader");
  const bool was_training = model->is_training();
  model->eval();
  at::NoGradGuard no_grad;
  EvalResult r;
  double loss_sum = 0, correct = 0, count = 0;
  loader.seek(0, 0);
  const int64_t n = max_batches > 0 ? std::min(max_batches, loader.steps_per_epoch()) : loader.steps_per_epoch();
  for (int64_t s = 0; s < n; ++s) {
    Batch b = loader.next();
    ForwardContext ctx;
    ctx.train = false;
    ctx.stats = &r.load;
    ctx.top_k = top_k;
    ctx.image_valid = b.valid;  // padding of the last batch: not routed, not counted
    at::Tensor lp = ensemble_log_probs(model->forward(b.images, ctx));  // [b, C]
    at::Tensor valid = b.valid;
    at::Tensor nll = -lp.gather(1, b.labels.unsqueeze(1)).squeeze(1);
    loss_sum += nll.masked_select(valid).sum().item<double>();
    correct += (lp.argmax(1) == b.labels).logical_and(valid).sum().item<double>();
    count += valid.sum().item<double>();
  }
  at::Tensor t = at::tensor({loss_sum, correct, count}, at::kDouble);
  comms.host->all_reduce(t, ReduceOp::Sum);
  all_reduce_stats(r.load, *comms.host);
  r.count = static_cast<int64_t>(t[2].item<double>());
  r.loss = t[0].item<double>() / std::max<double>(1, r.count);
  r.accuracy = t[1].item<double>() / std::max<double>(1, r.count);
  if (was_training) model->train();
  return r;
}

}  // namespace moeprune
