#include "train/trainer.h"

#include "train/grad_buckets.h"

#include <unistd.h>

#include <chrono>

#include "core/error.h"
#include "core/log.h"
#include "core/hardware.h"
#include "core/precision.h"

namespace moeprune {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

nlohmann::json layer_json(const RoutingStats& stats) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [layer, s] : stats) {
    double sum = 0, mx = 0;
    int64_t assigned = 0, kept = 0;
    for (size_t e = 0; e < s.kept.size(); ++e) {
      sum += static_cast<double>(s.kept[e]);
      mx = std::max(mx, static_cast<double>(s.kept[e]));
      assigned += s.assigned[e];
      kept += s.kept[e];
    }
    const double mean = sum / std::max<size_t>(1, s.kept.size());
    out[std::to_string(layer)] = {{"imbalance", mean > 0 ? mx / mean : 0.0},
                                  {"dropped_fraction", assigned > 0 ? 1.0 - static_cast<double>(kept) / assigned : 0.0},
                                  {"kept", s.kept}};
  }
  return out;
}

}  // namespace

std::vector<ParamSlot> param_slots(const VisionTransformer& model) {
  std::vector<ParamSlot> out;
  for (const auto& item : model->named_parameters()) {
    ParamSlot s;
    s.name = item.key();
    s.param = item.value();
    s.expert = is_expert_param(item.key());
    if (s.expert) {
      s.block = block_of_param(s.name);
      const MoeLayer layer = moe_layer_of(model, s.block);
      s.expert_ids = layer->experts->expert_ids();
      const Placement& pl = layer->placement();
      if (pl.has_replicas()) {
        s.primary = layer->primary_copies();
        std::vector<int64_t> rows;
        for (size_t i = 0; i < s.primary.size(); ++i)
          if (s.primary[i]) rows.push_back(static_cast<int64_t>(i));
        s.primary_rows = at::tensor(rows, at::kLong).to(s.param.device());
        const auto& ids = layer->expert_ids();
        for (int e = 0; e < pl.num_experts(); ++e)
          if (pl.replicas(e) > 1) s.replicated_ids.push_back(ids[static_cast<size_t>(e)]);
      }
    }
    out.push_back(std::move(s));
  }
  return out;
}

Trainer::Trainer(Comms comms, const JobConfig& job, const PhaseConfig& settings, Phase phase,
                 VisionTransformer& model, MetricsSink& metrics)
    : comms_(comms), job_(job), phase_(settings), phase_id_(phase), name_(str(phase)), model_(model),
      metrics_(metrics), opt_(settings, param_slots(model)) {}

PhaseResult Trainer::run(ShardedLoader& train, ShardedLoader& val, ShardedLoader* test, const TrainHooks& hooks,
                         int64_t start_step) {
  const ModelConfig& mc = model_->config();
  const int W = comms_.size(), r = comms_.rank();
  const int accum = phase_.accumulation;
  const int64_t micro = phase_.batch_size / accum;  // global images per micro-batch
  const int64_t local = micro / W;
  const int64_t groups = micro / mc.moe.group_size;
  const int M = mc.moe.ensemble_size;
  const int64_t T = mc.tokens_per_image();
  TORCH_CHECK(train.options().global_batch == micro, "trainer: loader batch must be the micro-batch");

  model_->train();
  PhaseResult result;
  if (start_step > 0) {
    const auto [e, s] = train.position();
    log::info(concat(name_, ": resuming at step ", start_step, " (loader epoch ", e, " step ", s, ")"));
  }
  Progress progress(name_, phase_.steps, r == 0);
  log::info(concat(name_, ": ", phase_.steps, " steps of ", phase_.batch_size, " images (", accum,
                   " micro-batches) on ", W, " ranks, ", name_of(phase_.optimizer), " ", name_of(phase_.precision), " lr ", phase_.lr, ", train split ",
                   train.split().size(), " examples, ", train.steps_per_epoch(), " steps per epoch"));
  if (phase_.precision == Precision::Bf16 && model_->parameters().front().device().is_cpu())
    if (const std::string w = cpu_bf16_warning(); !w.empty()) log::warn(concat(name_, ": precision bf16: ", w));
  const auto phase_start = Clock::now();
  // Window accumulators between log lines.
  double w_loss = 0, w_correct = 0, w_count = 0, w_time = 0, w_norm = 0;
  MoeTimers w_timers;
  RoutingStats w_stats;
  int64_t w_steps = 0, epoch = 0;
  const uint64_t phase_salt = phase_info(phase_id_).seed_salt;

  // Dense gradients: all-reduced in buckets during the last micro-batch's backward
  // (parallel.grad_reduce: overlap), or in one piece after it (flat).
  std::unique_ptr<GradBuckets> buckets;
  if (job_.parallel.grad_reduce == GradReduce::Overlap && W > 1)
    buckets = std::make_unique<GradBuckets>(opt_.slots(), comms_.grad(),
                                            static_cast<int64_t>(job_.parallel.bucket_mb * (1 << 20)));
  double w_sync = 0;

  int64_t steps_done = start_step;
  for (int64_t step = start_step; step < phase_.steps; ++step) {
    const auto t0 = Clock::now();
    const double lr = learning_rate(phase_, step);
    opt_.zero_grad();
    RoutingStats stats;
    MoeTimers timers;
    for (int a = 0; a < accum; ++a) {
      Batch b = train.next();
      epoch = b.epoch;
      ForwardContext ctx;
      ctx.in.train = true;
      ctx.in.noise_seed = mix_seed(phase_seed(job_, phase_), phase_salt, static_cast<uint64_t>(step * accum + a));
      ctx.in.first_group = r * local / mc.moe.group_size;
      ctx.in.total_groups = groups;
      ctx.in.entropy_weight = phase_.router_entropy_weight;
      ctx.probes.stats = &stats;
      ctx.probes.timers = &timers;
      at::Tensor logits;
      {
        AutocastGuard amp(b.images.device(), phase_.precision);
        logits = model_->forward(b.images, ctx);
      }
      logits = logits.to(at::kFloat);  // loss in float32
      at::Tensor ce = cross_entropy_sum(logits, b.labels);
      at::Tensor loss = ce / static_cast<double>(micro * accum) +
                        ctx.aux_loss / static_cast<double>(M * groups * accum);
      if (buckets && a == accum - 1) buckets->arm();
      loss.backward();
      w_loss += ce.item<double>();
      w_correct += (ensemble_log_probs(logits.detach()).argmax(1) == b.labels).sum().item<double>();
      w_count += static_cast<double>(b.labels.size(0));
    }
    const auto t_sync = Clock::now();
    if (buckets) buckets->finish();
    opt_.sync_gradients(comms_, /*dense=*/!buckets);
    w_sync += since(t_sync);
    try {
      w_norm += opt_.step(comms_, lr);
    } catch (const DivergedError& e) {
      throw DivergedError(concat(name_, " step ", step + 1, " diverged: ", e.what()));
    }
    w_time += since(t0);
    w_timers.router += timers.router;
    w_timers.dispatch += timers.dispatch;
    w_timers.experts += timers.experts;
    w_timers.combine += timers.combine;
    for (const auto& [l, s] : stats) w_stats[l].add(s);
    ++w_steps;
    if (hooks.on_step) hooks.on_step(step + 1, stats);

    const bool last = step + 1 == phase_.steps;
    if ((step + 1) % phase_.log_every == 0 || last) {
      // Window figures, summed over ranks; time is the slowest rank's.
      at::Tensor t = at::tensor({w_loss, w_correct, w_count}, at::kDouble);
      comms_.host->all_reduce(t, ReduceOp::Sum);
      at::Tensor tm = at::tensor({w_time, peak_rss_mib()}, at::kDouble);
      comms_.host->all_reduce(tm, ReduceOp::Max);
      all_reduce_stats(w_stats, *comms_.host);
      const double count = t[2].item<double>();
      const double loss = t[0].item<double>() / count, acc = t[1].item<double>() / count;
      const double sec = tm[0].item<double>();
      const double ips = count / sec;
      result.train_loss = loss;
      nlohmann::json rec = {
          {"phase", name_}, {"step", step + 1}, {"epoch", epoch}, {"loss", loss}, {"accuracy", acc}, {"lr", lr},
          {"grad_norm", w_norm / w_steps}, {"images_per_s", ips}, {"tokens_per_s", ips * T * M},
          {"step_time_s",
           {{"total", sec / w_steps},
            {"router", w_timers.router / w_steps},
            {"dispatch", w_timers.dispatch / w_steps},
            {"experts", w_timers.experts / w_steps},
            {"combine", w_timers.combine / w_steps},
            {"grad_sync", w_sync / w_steps},
            {"rest", (w_time - w_timers.router - w_timers.dispatch - w_timers.experts - w_timers.combine - w_sync) /
                         w_steps}}},
          {"grad_reduce", buckets ? concat("overlap (", buckets->size(), " buckets)") : std::string("flat")},
          {"peak_rss_mib", tm[1].item<double>()}, {"moe_layers", layer_json(w_stats)}};
      metrics_.write(rec);
      if (!::isatty(2) || last)
        log::info(concat(name_, " step ", step + 1, "/", phase_.steps, " epoch ", epoch, " loss ", loss, " acc ", acc,
                         " lr ", lr, " ", static_cast<int>(ips), " img/s"));
      progress.update(step + 1, concat("loss ", loss, " acc ", acc));
      w_loss = w_correct = w_count = w_time = w_norm = w_sync = 0;
      w_timers = {};
      w_stats.clear();
      w_steps = 0;
    }
    if (hooks.on_history && phase_.history_every > 0 && ((step + 1) % phase_.history_every == 0 || last))
      hooks.on_history(step + 1);
    if (phase_.eval_every > 0 && (step + 1) % phase_.eval_every == 0 && !last) {
      EvalResult v = evaluate(model_, val, comms_);
      metrics_.write({{"phase", name_}, {"step", step + 1}, {"val_loss", v.loss}, {"val_accuracy", v.accuracy}});
      log::info(concat(name_, " step ", step + 1, ": validation accuracy ", v.accuracy, " loss ", v.loss));
    }
    steps_done = step + 1;
    if (hooks.after_step && hooks.after_step(step + 1) && !last) {
      result.stopped = true;
      break;
    }
  }
  progress.finish();
  result.seconds = since(phase_start);
  result.steps = steps_done;
  result.images_per_s = static_cast<double>(steps_done - start_step) * phase_.batch_size / result.seconds;
  if (result.stopped) return result;
  result.val = evaluate(model_, val, comms_);
  if (test) result.test = evaluate(model_, *test, comms_);
  nlohmann::json end = {{"phase", name_}, {"step", phase_.steps}, {"event", "end"},
                        {"val_loss", result.val.loss}, {"val_accuracy", result.val.accuracy},
                        {"train_images_per_s", result.images_per_s}, {"seconds", result.seconds}};
  if (test) {
    end["test_loss"] = result.test.loss;
    end["test_accuracy"] = result.test.accuracy;
  }
  metrics_.write(end);
  return result;
}

}  // namespace moeprune
