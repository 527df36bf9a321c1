// Validation of a parsed job config: every rule in one place, each failure a
// UserError naming the key, its value and what was expected.
#include <algorithm>
#include <set>

#include "core/config.h"
#include "core/error.h"
#include "core/phase.h"
#include "core/pixel_code.h"

namespace moeprune {
namespace {

void validate_phase(const PhaseConfig& p, const std::string& name, const ModelConfig& m) {
  auto key = [&](const char* k) { return name + "." + k; };
  require(p.lr > 0, concat("config: ", key("lr"), "=", p.lr, " must be > 0"));
  require(p.end_lr >= 0 && p.end_lr <= p.lr,
          concat("config: ", key("end_lr"), "=", p.end_lr, " must be in [0, ", key("lr"), "=", p.lr, "]"));
  require(p.steps > 0, concat("config: ", key("steps"), "=", p.steps, " must be > 0"));
  require(p.warmup_steps >= 0 && p.warmup_steps <= p.steps,
          concat("config: ", key("warmup_steps"), "=", p.warmup_steps, " must be in [0, ", key("steps"), "]"));
  require(p.batch_size > 0, concat("config: ", key("batch_size"), "=", p.batch_size, " must be > 0"));
  require(p.accumulation > 0 && p.batch_size % p.accumulation == 0,
          concat("config: ", key("accumulation"), "=", p.accumulation, " must divide ", key("batch_size"), "=",
                 p.batch_size));
  // (A disabled phase never runs: its batch need not split into this model's groups.)
  require(!p.enabled || (p.batch_size / p.accumulation) % m.moe.group_size == 0,
          concat("config: the micro-batch ", key("batch_size"), " / ", key("accumulation"), " = ",
                 p.batch_size / p.accumulation, " must be a multiple of model.moe.group_size=", m.moe.group_size,
                 " (routing groups are whole images)"));
  require(p.clip_norm >= 0 && p.weight_decay >= 0 && p.momentum >= 0 && p.momentum < 1,
          concat("config: ", name, ": clip_norm and weight_decay must be >= 0, momentum in [0, 1)"));
  require(p.log_every > 0 && p.eval_every >= 0 && p.history_every >= 0,
          concat("config: ", name, ": log_every must be > 0, eval_every and history_every >= 0"));
  require(p.label_map.empty() || p.label_map.size() == p.classes.size(),
          concat("config: ", key("label_map"), " has ", p.label_map.size(), " entries for ", p.classes.size(),
                 " classes; expected one label per class"));
  for (int l : p.label_map)
    require(l >= 0, concat("config: ", key("label_map"), " has label ", l, ", expected labels >= 0"));
  std::set<int> seen;
  for (int c : p.classes) {
    require(c >= 0, concat("config: ", key("classes"), " has class ", c, ", expected >= 0"));
    require(seen.insert(c).second, concat("config: ", key("classes"), " lists class ", c, " twice"));
  }
}

}  // namespace

void validate(const JobConfig& cfg) {
  const ModelConfig& m = cfg.model;
  const MoeConfig& e = m.moe;
  require(cfg.parallel.expert_parallel >= 0,
          concat("config: parallel.expert_parallel=", cfg.parallel.expert_parallel,
                 " must be >= 0 (0 = auto: the largest divisor of the world size that fits the experts)"));
  require(cfg.parallel.bucket_mb > 0 && cfg.parallel.bucket_mb <= 4096,
          concat("config: parallel.bucket_mb=", cfg.parallel.bucket_mb, " must be in (0, 4096] (MiB)"));
  auto positive = [](int v, const char* key) {
    require(v > 0, concat("config: ", key, "=", v, " must be a positive integer"));
  };
  positive(m.image_size, "model.image_size");
  positive(m.channels, "model.channels");
  positive(m.patch_size, "model.patch_size");
  positive(m.hidden, "model.hidden");
  positive(m.mlp_dim, "model.mlp_dim");
  positive(m.num_layers, "model.num_layers");
  positive(m.num_heads, "model.num_heads");
  positive(m.num_classes, "model.num_classes");
  require(m.representation_size >= 0,
          concat("config: model.representation_size=", m.representation_size, " must be >= 0 (0 = no pre_logits)"));
  positive(e.num_experts, "model.moe.num_experts");
  positive(e.top_k, "model.moe.top_k");
  positive(e.group_size, "model.moe.group_size");
  positive(e.ensemble_size, "model.moe.ensemble_size");
  require(m.image_size % m.patch_size == 0,
          concat("config: model.image_size=", m.image_size, " must be divisible by model.patch_size=", m.patch_size));
  require(m.hidden % m.num_heads == 0,
          concat("config: model.hidden=", m.hidden, " must be divisible by model.num_heads=", m.num_heads));
  require(e.every >= 0 && e.last >= 0, "config: model.moe.every and model.moe.last must be >= 0");
  require(!(e.every > 0 && e.last > 0),
          concat("config: set only one of model.moe.every (", e.every, ") and model.moe.last (", e.last,
              "); set the other to 0"));
  require(e.every > 0 || e.last > 0, "config: one of model.moe.every or model.moe.last must be > 0");
  require(e.every <= m.num_layers,
          concat("config: model.moe.every=", e.every, " is larger than model.num_layers=", m.num_layers));
  require(e.last <= m.num_layers / 2,
          concat("config: model.moe.last=", e.last, " exceeds the ", m.num_layers / 2, " odd blocks of model.num_layers=",
              m.num_layers));
  require(e.num_experts % e.ensemble_size == 0,
          concat("config: model.moe.num_experts=", e.num_experts, " must be divisible by model.moe.ensemble_size=",
              e.ensemble_size, " (each E3 member routes among its own E/M experts)"));
  const int experts_per_member = e.num_experts / e.ensemble_size;
  require(e.top_k <= experts_per_member,
          concat("config: model.moe.top_k=", e.top_k, " must be <= the experts each router chooses from (",
              experts_per_member, " = model.moe.num_experts / model.moe.ensemble_size)"));
  require(e.capacity_factor > 0,
          concat("config: model.moe.capacity_factor=", e.capacity_factor, " must be > 0"));
  require(e.noise_std >= 0, concat("config: model.moe.noise_std=", e.noise_std, " must be >= 0"));
  require(e.router_init_std >= 0,
          concat("config: model.moe.router_init_std=", e.router_init_std, " must be >= 0 (0 = vmoe's 1/sqrt(hidden))"));
  require(e.importance_loss_weight >= 0 && e.load_loss_weight >= 0,
          "config: model.moe.importance_loss_weight and load_loss_weight must be >= 0");
  const DataConfig& d = cfg.data;
  require(d.val_fraction >= 0 && d.val_fraction < 1,
          concat("config: data.val_fraction=", d.val_fraction, " must be in [0, 1)"));
  require(d.eval_batch_size > 0 && d.eval_batch_size % e.group_size == 0,
          concat("config: data.eval_batch_size=", d.eval_batch_size, " must be a positive multiple of "
                 "model.moe.group_size=", e.group_size));
  require(d.prefetch >= 0, "config: data.prefetch must be >= 0");
  require(d.augment.crop_padding >= 0, "config: data.augment.crop_padding must be >= 0");
  require(!(d.augment.inception_crop && d.augment.crop_padding > 0),
          "config: set only one of data.augment.inception_crop and data.augment.crop_padding (set it to 0)");
  require(d.augment.mean.size() == d.augment.std.size() &&
              (d.augment.mean.size() == 1 || static_cast<int>(d.augment.mean.size()) == m.channels),
          concat("config: data.augment.mean and std need 1 or model.channels=", m.channels, " values each"));
  for (double s : d.augment.std) require(s > 0, "config: data.augment.std values must be > 0");
  for (const std::string& code : d.domains) pixel_code(code);  // throws naming a malformed code
  require(d.domains.empty() || d.dataset != DatasetKind::Planted,
          "config: data.domains applies to image data sets, not to the synthetic planted task");
  require(d.planted_train > 0 && d.planted_test > 0 && d.planted_patches > 0 && d.planted_noise >= 0,
          "config: data.planted_* must be positive (noise >= 0)");
  require(d.dataset != DatasetKind::Planted ||
              (d.planted_tasks >= 1 && 2 * d.planted_tasks + 2 <= m.patch_size * m.patch_size),
          concat("config: data.planted_tasks=", d.planted_tasks, " needs 2 * tasks + 2 = ", 2 * d.planted_tasks + 2,
                 " orthonormal features within a patch of model.patch_size^2 = ", m.patch_size * m.patch_size,
                 " pixels (and tasks >= 1)"));
  require(d.planted_prototypes >= 0,
          concat("config: data.planted_prototypes=", d.planted_prototypes, " must be >= 0 (0 = the signed label feature)"));
  require(cfg.checkpoint.every >= 0, concat("config: checkpoint.every=", cfg.checkpoint.every, " must be >= 0"));
  require(cfg.checkpoint.keep >= 1, concat("config: checkpoint.keep=", cfg.checkpoint.keep, " must be >= 1"));
  require(cfg.runtime.moe.dispatch_chunks >= 1,
          concat("config: runtime.dispatch_chunks=", cfg.runtime.moe.dispatch_chunks, " must be >= 1"));
  require(cfg.runtime.threads >= 0, concat("config: runtime.threads=", cfg.runtime.threads, " must be >= 0"));
  for (const PhaseInfo& ph : phase_table())
    if (ph.section) validate_phase(cfg.*(ph.section), std::string(ph.name), m);
  const PruneConfig& p = cfg.prune;
  require(p.ratio >= 0 && p.ratio < 1, concat("config: prune.ratio=", p.ratio, " must be in [0, 1)"));
  require(p.count >= 0 && p.min_experts >= 0, "config: prune.count and prune.min_experts must be >= 0");
  require(!(p.ratio_auto && p.count > 0),
          concat("config: prune.ratio=auto and prune.count=", p.count, " both choose how many experts to prune; "
                 "expected one of them (prune.count: 0 with ratio: auto)"));
  require(p.max_accuracy_drop >= 0 && p.max_accuracy_drop <= 100,
          concat("config: prune.max_accuracy_drop=", p.max_accuracy_drop, " must be in [0, 100] (accuracy points)"));
  require(p.auto_step > 0 && p.auto_step < 1,
          concat("config: prune.auto_step=", p.auto_step, " must be in (0, 1)"));
  require(p.eval_top_k >= 0 && p.eval_top_k <= e.top_k,
          concat("config: prune.eval_top_k=", p.eval_top_k, " must be in [0, model.moe.top_k=", e.top_k, "]"));
  const auto blocks = m.moe_blocks();
  for (int b : p.layers)
    require(std::find(blocks.begin(), blocks.end(), b) != blocks.end(),
            concat("config: prune.layers lists block ", b, ", which is not an MoE block"));
  require(p.calibration.batches >= 0, "config: prune.calibration.batches must be >= 0");
  require(!p.replicate || p.rebalance, "config: prune.replicate needs prune.rebalance: true (replicas are placed by "
                                       "the rebalancer)");
  require(p.replica_imbalance >= 1.0,
          concat("config: prune.replica_imbalance=", p.replica_imbalance, " must be >= 1 (max / mean rank load)"));
  require(p.replica_memory_mb >= 0,
          concat("config: prune.replica_memory_mb=", p.replica_memory_mb, " must be >= 0 (0: the memory pruning freed)"));
  if (p.replicate && p.replica_memory_mb > 0) {
    const double layers = static_cast<double>(std::max<size_t>(1, blocks.size()));
    const double need = expert_copy_bytes(m.hidden, m.mlp_dim) * layers / (1 << 20);
    require(p.replica_memory_mb >= need,
            concat("config: prune.replica_memory_mb=", p.replica_memory_mb, " holds no replica: one expert copy in each of ",
                   blocks.size(), " MoE layers (hidden ", m.hidden, ", mlp_dim ", m.mlp_dim,
                   ") with its gradient and optimiser state needs ", need,
                   " MiB per rank; expected at least that, or 0 for the memory pruning freed"));
  }
}

int resolve_expert_parallel(int requested, int world_size, int min_experts) {
  if (requested > 0) {
    require(world_size % requested == 0,
            concat("parallel.expert_parallel=", requested, " does not divide the world size ", world_size,
                   ": expected a divisor of ", world_size, " (ranks = expert-data-parallel groups x expert_parallel)"));
    require(requested <= min_experts,
            concat("parallel.expert_parallel=", requested, " exceeds the ", min_experts,
                   " experts of a MoE layer: every rank of an expert-parallel group must hold at least one expert "
                   "(expected at most ", min_experts, ")"));
    return requested;
  }
  int best = 1;
  for (int n = 1; n <= std::min(world_size, min_experts); ++n)
    if (world_size % n == 0) best = n;
  return best;
}

int expert_parallel_of(const JobConfig& cfg, int world_size) {
  int min_experts = cfg.model.moe.num_experts;
  for (int b : cfg.model.moe_blocks())
    min_experts = std::min(min_experts, static_cast<int>(cfg.model.layer_experts(b).size()));
  return resolve_expert_parallel(cfg.parallel.expert_parallel, world_size, min_experts);
}

int validate_world(const JobConfig& cfg, int world_size) {
  const MoeConfig& e = cfg.model.moe;
  const int n = expert_parallel_of(cfg, world_size);
  auto check = [&](int images, const std::string& what) {
    const int groups = images / e.group_size;
    require(groups % world_size == 0,
            concat("world size ", world_size, " does not divide the ", groups, " routing groups of ", what, " (",
                   images, " images / model.moe.group_size=", e.group_size,
                   "): expected a world size that divides ", groups));
  };
  for (Phase ph : job_phases(cfg)) {
    if (!is_training(ph)) continue;
    const PhaseConfig& pc = phase_config(cfg, ph);
    check(pc.batch_size / pc.accumulation, concat("a ", phase_name(ph), " micro-batch"));
  }
  check(cfg.data.eval_batch_size, "an evaluation batch (data.eval_batch_size)");
  return n;
}

}  // namespace moeprune
