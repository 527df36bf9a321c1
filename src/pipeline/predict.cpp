#include "pipeline/predict.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
#include "core/npy.h"
#include "core/strings.h"
#include "pipeline/model_source.h"

namespace moeprune {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string default_out(const std::string& images) {
  std::filesystem::path p(images);
  return (p.parent_path() / (p.stem().string() + ".logits.npy")).string();
}

std::string ensemble_path(const std::string& out) {
  std::filesystem::path p(out);
  return (p.parent_path() / (p.stem().string() + ".ensemble.npy")).string();
}

// images as the model takes them: float32 [N, C, S, S]. uint8 pixels are scaled as
// the model's training did: vmoe models to [-1, 1] exactly as vmoe's
// value_range(-1, 1) computes it, moeprune models with data.augment's mean and std.
at::Tensor model_input(const at::Tensor& raw, const ModelConfig& mc, const SourceModel& src, const std::string& path,
                       std::string& how) {
  const int64_t S = mc.image_size, C = mc.channels;
  const auto sh = raw.sizes();
  at::Tensor x;
  if (raw.dim() == 4 && sh[1] == S && sh[2] == S && sh[3] == C) {
    x = raw.permute({0, 3, 1, 2});
    how = "NHWC -> NCHW";
  } else if (raw.dim() == 4 && sh[1] == C && sh[2] == S && sh[3] == S) {
    x = raw;
    how = "NCHW";
  } else {
    throw UserError(concat("predict: images '", path, "' are ", raw.sizes(), "; the model takes NHWC (N, ", S, ", ", S,
                           ", ", C, ") or NCHW (N, ", C, ", ", S, ", ", S, ") (image size ", S, ", ", C, " channels)"));
  }
  if (raw.scalar_type() == at::kByte) {
    at::Tensor t = x.to(at::kFloat) / 255.0f;
    if (src.kind == SourceKind::Vmoe) {
      x = t * 2.0f - 1.0f;
      how += ", uint8 -> -1 + x/255*2 (vmoe's value_range(-1, 1))";
    } else {
      auto chan = [&](const std::vector<double>& v) {
        std::vector<float> f(static_cast<size_t>(C));
        for (int64_t c = 0; c < C; ++c) f[static_cast<size_t>(c)] = static_cast<float>(v.size() == 1 ? v[0] : v[c]);
        return at::tensor(f).view({1, C, 1, 1});
      };
      x = (t - chan(src.pixel_mean)) / chan(src.pixel_std);
      how += concat(", uint8 -> (x/255 - mean) / std with ", src.kind == SourceKind::Checkpoint ? "the checkpoint's" : "the config's",
                    " data.augment.mean ", join(src.pixel_mean, ","), ", std ", join(src.pixel_std, ","));
    }
  } else {
    x = x.to(at::kFloat);
    how += ", float taken as the model's input (already scaled)";
  }
  return x.contiguous();
}

}  // namespace

int run_predict(World& world, const JobConfig& cfg, const PredictOptions& opts) {
  const std::string out = opts.out.empty() ? default_out(opts.images) : opts.out;
  at::Tensor raw;
  world.agree([&] {
    require(!opts.init.empty(), "predict: give the model with --init (vmoe prefix, checkpoint or model file)");
    require(!opts.images.empty(), "predict: give the images with --images FILE.npy");
    raw = read_npy(opts.images);
    const auto dir = std::filesystem::path(out).parent_path();
    std::error_code ec;
    require(dir.empty() || std::filesystem::is_directory(dir, ec),
            concat("predict: the output directory '", dir.string(), "' does not exist"));
  });
  SourceModel src = load_source_model(cfg, opts.init, world);
  VisionTransformer& model = src.model;
  const ModelConfig& mc = model->config();
  std::string how;
  at::Tensor images;
  world.agree([&] { images = model_input(raw, mc, src, opts.images, how); });
  raw = at::Tensor();
  const int64_t N = images.size(0), W = world.size(), gs = mc.moe.group_size, M = mc.moe.ensemble_size;
  require(N > 0, concat("predict: '", opts.images, "' holds no images"));
  log::info(concat("predict: ", src.description));
  log::info(concat("predict: ", N, " images (", how, "), ", mc.name, ": ", mc.num_layers, " blocks, hidden ", mc.hidden,
                   ", ", mc.moe.num_experts, " experts in blocks ", join(mc.moe_blocks(), ","), ", top-", mc.moe.top_k, ", capacity factor ", mc.moe.capacity_factor, ", groups of ", gs,
                   " images", M > 1 ? concat(", ", M, " ensemble members") : std::string()));

  // Global batches of whole routing groups on every rank.
  const int64_t step = std::min(round_up(cfg.data.eval_batch_size, W * gs), round_up(N, W * gs));
  const int64_t per_rank = step / W;
  model->eval();
  at::NoGradGuard ng;
  std::vector<at::Tensor> mine;  // [M, per_rank, C] per batch (padding included)
  for (int64_t begin = 0; begin < N; begin += step) {
    const int64_t lo = begin + world.rank() * per_rank;
    const int64_t real = std::clamp<int64_t>(N - lo, 0, per_rank);
    at::Tensor batch = at::zeros({per_rank, images.size(1), images.size(2), images.size(3)});
    if (real > 0) batch.narrow(0, 0, real).copy_(images.narrow(0, lo, real));
    at::Tensor valid = at::arange(per_rank) < real;
    ForwardContext ctx;
    ctx.in.train = false;
    ctx.in.image_valid = valid;
    ctx.in.total_groups = step / gs;
    ctx.in.first_group = (begin / gs) + world.rank() * (per_rank / gs);
    mine.push_back(model->forward(batch.to(world.device()), ctx).to(at::kCPU).to(at::kFloat));
  }
  // Rank 0 gathers every rank's shares in image order.
  at::Tensor local = at::stack(mine, 0).contiguous();  // [batches, M, per_rank, C]
  Communicator& host = world.host_comm();
  if (world.rank() != 0) {
    host.send(local, 0, 23);
    return kExitOk;
  }
  std::vector<at::Tensor> parts{local};
  for (int r = 1; r < W; ++r) {
    at::Tensor p = at::empty_like(local);
    host.recv(p, r, 23);
    parts.push_back(p);
  }
  // [batches, W, M, per_rank, C] -> [M, batches*W*per_rank, C] -> the N real images.
  at::Tensor all = at::stack(parts, 1).permute({2, 0, 1, 3, 4}).reshape({M, -1, mc.num_classes}).narrow(1, 0, N);
  // vmoe's order: one row per (image, member), row b*M + m.
  const at::Tensor logits = all.permute({1, 0, 2}).reshape({N * M, mc.num_classes}).contiguous();
  write_npy(out, logits);
  log::info(concat("predict: wrote logits ", logits.sizes(), M > 1 ? " (row b*M + m: image b, member m)" : "", " to ",
                   out));
  if (M > 1) {
    const std::string ens = opts.ensemble_out.empty() ? ensemble_path(out) : opts.ensemble_out;
    write_npy(ens, ensemble_log_probs(all).contiguous());
    log::info(concat("predict: wrote ensemble log-probabilities (", N, ", ", mc.num_classes, ") to ", ens));
  }
  return kExitOk;
}

}  // namespace moeprune
