#include "pipeline/job.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <csignal>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "model/model_state.h"

namespace moeprune {

std::string pretrained_path(const JobConfig& cfg) { return cfg.output.dir + "/pretrained.safetensors"; }
std::string finetuned_path(const JobConfig& cfg) { return cfg.output.dir + "/finetuned.safetensors"; }
std::string history_path(const JobConfig& cfg) { return cfg.output.dir + "/router_history.json"; }
std::string report_path(const JobConfig& cfg) { return cfg.output.dir + "/prune_report.json"; }
std::string metrics_path(const JobConfig& cfg) { return cfg.output.dir + "/metrics.jsonl"; }
std::string finetune_init(const JobConfig& cfg) {
  return cfg.finetune.init.empty() ? pretrained_path(cfg) : cfg.finetune.init;
}

PhaseData phase_data(const JobConfig& cfg, const PhaseConfig& task, const std::string& task_name) {
  std::shared_ptr<const Dataset> train = load_dataset(cfg, SplitPart::Train);
  std::shared_ptr<const Dataset> test = load_dataset(cfg, SplitPart::Test);
  const double vf = cfg.data.val_fraction;
  PhaseData d{make_split(train, task, task_name, SplitPart::Train, vf),
              make_split(train, task, task_name, SplitPart::Val, vf),
              make_split(test, task, task_name, SplitPart::Test, vf)};
  log::info(concat(task_name, " data: ", train->name, " classes ", d.train.num_labels, " labels; train ",
                   d.train.size(), ", val ", d.val.size(), ", test ", d.test.size(), " examples"));
  return d;
}

LoaderOptions loader_options(const JobConfig& cfg, const World& world, int64_t batch, bool train, uint64_t seed) {
  LoaderOptions o;
  o.global_batch = batch;
  o.rank = world.rank();
  o.world = world.size();
  o.seed = seed;
  o.train = train;
  o.augment = cfg.data.augment;
  o.image_size = cfg.model.image_size;
  o.channels = cfg.model.channels;
  o.prefetch = cfg.data.prefetch;
  o.device = world.device();
  return o;
}

namespace {
// Bytes one rank needs for the model: parameters with gradients and two optimiser
// moments (16 bytes each), plus activations kept for backward of the largest batch
// a rank sees (a coarse bound, float32). Computed in double: sizes that overflow an
// int are refused here, before anything is allocated.
double bytes_per_rank(const JobConfig& cfg, const ModelConfig& mc, const std::vector<Placement>& placements, int W,
                      bool inference) {
  const double H = mc.hidden, F = mc.mlp_dim, L = mc.num_layers, C = mc.channels, P = mc.patch_size;
  const double grid = static_cast<double>(mc.image_size) / P, T = grid * grid + 1;
  size_t max_local = 0;
  for (const auto& pl : placements)
    for (int r = 0; r < pl.world_size(); ++r) max_local = std::max(max_local, pl.local_experts(r).size());
  const double moe_layers = static_cast<double>(placements.size());
  const double dense = C * P * P * H + T * H + L * (4 * H * H + 9 * H) + (L - moe_layers) * (2 * H * F + F + H) +
                       moe_layers * H * mc.moe.num_experts + H * mc.num_classes;
  const double experts = moe_layers * static_cast<double>(max_local) * (2 * H * F + F + H);
  if (inference) {  // weights, and one evaluation batch's activations of a few layers at a time
    const double images = std::ceil(static_cast<double>(cfg.data.eval_batch_size) / W) * mc.moe.ensemble_size;
    return 4 * (dense + experts) + images * T * (12 * H + 2 * F * mc.moe.top_k + mc.num_heads * T) * 4;
  }
  int batch = 0;  // evaluation keeps no activations for backward
  for (const PhaseConfig* p : {&cfg.pretrain, &cfg.finetune, &cfg.refinetune})
    batch = std::max(batch, p->batch_size / std::max(1, p->accumulation));  // one micro-batch at a time
  const double per_rank_images = std::ceil(static_cast<double>(batch) / W) * mc.moe.ensemble_size;
  const double activations = per_rank_images * T * L * (12 * H + 2 * F * mc.moe.top_k + mc.num_heads * T) * 4;
  return 16 * (dense + experts) + activations;
}

// MemAvailable of this node, in bytes (0 when unknown).
double available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return 0;
}
}  // namespace

VisionTransformer build_job_model(const JobConfig& cfg, const ModelConfig& mc, const std::vector<Placement>& placements,
                                  World& world, bool inference) {
  // A model that cannot fit is a one-line error on every rank, not an allocation
  // failure with a backtrace (or the kernel's OOM killer).
  world.agree([&] {
    const double need = bytes_per_rank(cfg, mc, placements, world.size(), inference);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    require(std::isfinite(need) && need < 1e18,
            concat("model: ", mc.name, " is too large to be built (hidden ", mc.hidden, ", mlp_dim ", mc.mlp_dim,
                   ", image_size ", mc.image_size, ", ", mc.moe.num_experts, " experts, ", mc.num_classes,
                   " classes)"));
    const double avail = available_bytes();
    if (world.device().is_cpu() && avail > 0) {
      const double per_rank = avail / std::max(1, world.local_size());
      require(need <= per_rank,
              concat("model: ", mc.name, " needs about ", need / gib, " GiB per rank (",
                     inference ? "weights and the activations of an evaluation batch"
                               : "weights, gradients and optimiser moments, and activations of the largest batch",
                     "), this node has ", per_rank / gib,
                     " GiB available per rank (MemAvailable / ", world.local_size(), " ranks): use a smaller model "
                     "or batch, or more ranks"));
    }
  });
  return build_model(mc, placements, world.comms().ep(), world.device(), cfg.seed, cfg.runtime.moe);
}

VisionTransformer build_saved_model(const JobConfig& cfg, const Manifest& m, World& world, bool inference) {
  const ModelLayout layout = layout_from_json(m.section("model"), m.dir);
  return build_job_model(cfg, model_config_of(cfg.model, layout), placements_of(layout, world.ep_size()), world,
                         inference);
}

// ---------------------------------------------------------------------------
bool JobProgress::is_finished(Phase p) const { return std::find(finished.begin(), finished.end(), p) != finished.end(); }

void JobProgress::finish(Phase p) {
  if (!is_finished(p)) finished.push_back(p);
}

namespace {
std::string to_hex(const at::Tensor& bytes) {
  static const char* d = "0123456789abcdef";
  std::string s;
  const auto* p = bytes.data_ptr<uint8_t>();
  for (int64_t i = 0; i < bytes.numel(); ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

at::Tensor from_hex(const std::string& s, const std::string& where) {
  require(s.size() % 2 == 0 && s.find_first_not_of("0123456789abcdef") == std::string::npos,
          concat("checkpoint ", where, ": the stored generator state is not hexadecimal"));
  at::Tensor t = at::empty({static_cast<int64_t>(s.size() / 2)}, at::kByte);
  auto* p = t.data_ptr<uint8_t>();
  for (size_t i = 0; i + 1 < s.size(); i += 2) p[i / 2] = static_cast<uint8_t>(std::stoi(s.substr(i, 2), nullptr, 16));
  return t;
}
}  // namespace

void JobProgress::save_state(StateWriter& out) const {
  std::vector<std::string> names;
  for (Phase p : finished) names.push_back(str(p));
  out.meta()["finished_phases"] = names;
  out.meta()["rng_scheme"] = "counter-based: loader (seed, epoch, step), router noise (seed, phase, micro-step)";
  out.meta()["torch_cpu_state"] = to_hex(at::detail::getDefaultCPUGenerator().get_state());
}

JobProgress JobProgress::from_meta(const nlohmann::json& meta, const std::string& where) {
  std::vector<std::string> names;
  try {
    names = meta.at("finished_phases").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(concat("checkpoint ", where, ": the job progress lacks a field or has a wrong type: ", e.what()));
  }
  JobProgress p;
  for (const auto& n : names) p.finish(parse_phase(n, concat("checkpoint ", where, ": finished phase")));
  return p;
}

void JobProgress::load_state(const StateReader& in) {
  finished = from_meta(in.meta(), in.where()).finished;
  std::string rng;
  try {
    rng = in.meta().at("torch_cpu_state").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(concat("checkpoint ", in.where(), ": the job progress lacks a field or has a wrong type: ",
                           e.what()));
  }
  at::Tensor state = from_hex(rng, in.where());
  try {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(state);
  } catch (const c10::Error&) {
    throw UserError(concat("checkpoint ", in.where(), ": the stored generator state is not one torch can restore"));
  }
}

// ---------------------------------------------------------------------------
std::atomic<int> g_stop_signal{0};

namespace {
void on_signal(int sig) { g_stop_signal.store(sig); }
}  // namespace

void install_stop_signals() {
  std::signal(SIGTERM, on_signal);
  std::signal(SIGUSR1, on_signal);
}

}  // namespace moeprune
