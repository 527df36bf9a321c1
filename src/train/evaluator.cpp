#include "train/evaluator.h"

namespace moeprune {

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
    ctx.in.train = false;
    ctx.in.top_k = top_k;
    ctx.in.image_valid = b.valid;  // padding of the last batch: not routed, not counted
    ctx.probes.stats = &r.load;
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
