#include "data/loader.h"

#include <ATen/CPUGeneratorImpl.h>

#include <nlohmann/json.hpp>

#include <cmath>

#include "core/error.h"

namespace moeprune {

ShardedLoader::ShardedLoader(Split split, LoaderOptions opts) : split_(std::move(split)), opts_(opts) {
  TORCH_CHECK(opts_.global_batch % opts_.world == 0, "loader: global batch not divisible by world size");
  if (opts_.train)
    require(split_.size() >= opts_.global_batch,
            concat("data: ", split_.name, " has ", split_.size(), " examples, fewer than one batch of ",
                   opts_.global_batch));
  start_prefetch();
}

ShardedLoader::~ShardedLoader() { stop_prefetch(); }

int64_t ShardedLoader::steps_per_epoch() const {
  const int64_t n = split_.size(), b = opts_.global_batch;
  return opts_.train ? n / b : (n + b - 1) / b;
}

std::vector<int64_t> ShardedLoader::order(int64_t epoch) const {
  const int64_t n = split_.size();
  if (!opts_.train) {
    std::vector<int64_t> o(n);
    for (int64_t i = 0; i < n; ++i) o[i] = i;
    return o;
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(mix_seed(opts_.seed, 0x5eed, static_cast<uint64_t>(epoch)));
  at::Tensor p = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
  return std::vector<int64_t>(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + n);
}

Batch ShardedLoader::make_batch(int64_t epoch, int64_t step) const {
  const int64_t B = opts_.global_batch, b = B / opts_.world, n = split_.size();
  const std::vector<int64_t> ord = order(epoch);
  std::vector<int64_t> examples, labels;
  std::vector<uint8_t> valid;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t pos = step * B + opts_.rank * b + i;
    const bool ok = pos < n;
    const int64_t k = ok ? ord[pos] : 0;  // padding repeats example 0 and is masked
    examples.push_back(split_.index[k]);
    labels.push_back(split_.label[k]);
    valid.push_back(ok);
  }
  at::Tensor x = split_.data->images(examples).to(at::kFloat).div_(255.0);  // [b, C, h, w]
  if (opts_.train && opts_.augment.inception_crop) {
    x = inception_crop(x, epoch, step);
  } else if (opts_.train && (opts_.augment.crop_padding > 0 || opts_.augment.flip)) {
    // Draws for the whole global batch, then this rank's slice: world-size independent.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(
        mix_seed(opts_.seed, static_cast<uint64_t>(epoch) + 1, static_cast<uint64_t>(step) + 1));
    const int64_t p = opts_.augment.crop_padding;
    at::Tensor dx = at::randint(2 * p + 1, {B}, gen, at::TensorOptions().dtype(at::kLong));
    at::Tensor dy = at::randint(2 * p + 1, {B}, gen, at::TensorOptions().dtype(at::kLong));
    at::Tensor flip = at::rand({B}, gen) < 0.5;
    const int64_t h = x.size(2), w = x.size(3), C = x.size(1);
    at::Tensor padded = p > 0 ? at::constant_pad_nd(x, {p, p, p, p}, 0.0) : x;
    // This rank's draws; crop and flip as two gathers over index grids.
    dx = dx.narrow(0, opts_.rank * b, b);
    dy = dy.narrow(0, opts_.rank * b, b);
    flip = flip.narrow(0, opts_.rank * b, b).logical_and(at::scalar_tensor(opts_.augment.flip));
    at::Tensor ar_h = at::arange(h, at::kLong), ar_w = at::arange(w, at::kLong);
    at::Tensor rows = dy.unsqueeze(1) + ar_h.unsqueeze(0);                                 // [b, h]
    at::Tensor cols = dx.unsqueeze(1) + at::where(flip.unsqueeze(1), (w - 1) - ar_w, ar_w);  // [b, w]
    at::Tensor t = padded.gather(2, rows.view({b, 1, h, 1}).expand({b, C, h, padded.size(3)}));
    x = t.gather(3, cols.view({b, 1, 1, w}).expand({b, C, h, w}));
  }
  if (x.size(1) == 1 && opts_.channels == 3) x = x.expand({x.size(0), 3, x.size(2), x.size(3)});
  TORCH_CHECK(x.size(1) == opts_.channels, "data: images have ", x.size(1), " channels, the model expects ",
              opts_.channels);
  if (x.size(2) != opts_.image_size || x.size(3) != opts_.image_size)
    x = at::upsample_bilinear2d(x, {opts_.image_size, opts_.image_size}, /*align_corners=*/false);
  const auto& m = opts_.augment.mean;
  const auto& s = opts_.augment.std;
  at::Tensor mean = at::tensor(m, at::kFloat).to(at::kFloat), sd = at::tensor(s, at::kFloat).to(at::kFloat);
  if (m.size() == 1) {
    mean = mean.expand({x.size(1)});
    sd = sd.expand({x.size(1)});
  }
  x = (x - mean.view({1, -1, 1, 1})) / sd.view({1, -1, 1, 1});
  Batch batch;
  batch.images = x.contiguous().to(opts_.device);
  batch.labels = at::tensor(labels, at::kLong).to(opts_.device);
  batch.valid = at::tensor(std::vector<int64_t>(valid.begin(), valid.end()), at::kLong).to(at::kBool).to(opts_.device);
  batch.epoch = epoch;
  batch.step = step;
  return batch;
}

at::Tensor ShardedLoader::inception_crop(const at::Tensor& x, int64_t epoch, int64_t step) const {
  // Boxes drawn for the whole global batch (every rank draws all, keeps its own):
  // area fraction uniform in [0.05, 1], log aspect ratio uniform in [log 3/4, log 4/3],
  // up to 10 tries to fit the image, else the whole image; then a flip.
  const int64_t B = opts_.global_batch, b = B / opts_.world, h = x.size(2), w = x.size(3);
  const int S = opts_.image_size;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(
      mix_seed(opts_.seed ^ 0x1ce9c809ULL, static_cast<uint64_t>(epoch) + 1, static_cast<uint64_t>(step) + 1));
  at::Tensor u = at::rand({B, 10, 4}, gen).to(at::kDouble);  // area, ratio, x, y per try
  at::Tensor flips = at::rand({B}, gen) < 0.5;
  const double lo = std::log(3.0 / 4.0), hi = std::log(4.0 / 3.0);
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t g = opts_.rank * b + i;
    const auto* d = u[g].data_ptr<double>();
    int64_t cw = w, ch = h, x0 = 0, y0 = 0;
    for (int t = 0; t < 10; ++t) {
      const double area = (0.05 + 0.95 * d[4 * t]) * static_cast<double>(h * w);
      const double ratio = std::exp(lo + (hi - lo) * d[4 * t + 1]);
      const auto tw = static_cast<int64_t>(std::llround(std::sqrt(area * ratio)));
      const auto th = static_cast<int64_t>(std::llround(std::sqrt(area / ratio)));
      if (tw < 1 || th < 1 || tw > w || th > h) continue;
      cw = tw;
      ch = th;
      x0 = std::min<int64_t>(w - cw, static_cast<int64_t>(d[4 * t + 2] * static_cast<double>(w - cw + 1)));
      y0 = std::min<int64_t>(h - ch, static_cast<int64_t>(d[4 * t + 3] * static_cast<double>(h - ch + 1)));
      break;
    }
    at::Tensor crop = x.narrow(0, i, 1).narrow(2, y0, ch).narrow(3, x0, cw);
    crop = at::upsample_bilinear2d(crop, {S, S}, /*align_corners=*/false);
    if (opts_.augment.flip && flips[g].item<bool>()) crop = crop.flip({3});
    out.push_back(crop);
  }
  return at::cat(out, 0);
}

void ShardedLoader::start_prefetch() {
  if (opts_.prefetch <= 0) return;
  stop_ = false;
  worker_ = std::thread([this, epoch = epoch_, step = step_]() mutable {
    try {
      const int64_t per_epoch = steps_per_epoch();
      while (true) {
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return stop_ || static_cast<int>(queue_.size()) < opts_.prefetch; });
          if (stop_) return;
        }
        Batch b = make_batch(epoch, step);
        if (++step == per_epoch) {
          step = 0;
          ++epoch;
        }
        std::lock_guard<std::mutex> lock(mu_);
        queue_.push_back(std::move(b));
        cv_.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
    }
  });
}

void ShardedLoader::stop_prefetch() {
  if (!worker_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  worker_.join();
  queue_.clear();
  error_ = nullptr;
}

void ShardedLoader::seek(int64_t epoch, int64_t step) {
  TORCH_CHECK(step >= 0 && step < steps_per_epoch(), "loader: step ", step, " outside the epoch");
  stop_prefetch();
  epoch_ = epoch;
  step_ = step;
  start_prefetch();
}

void ShardedLoader::save_state(StateWriter& out) const {
  out.meta()["epoch"] = epoch_;
  out.meta()["step"] = step_;
}

void ShardedLoader::load_state(const StateReader& in) {
  int64_t epoch = 0, step = 0;
  try {
    epoch = in.meta().at("epoch").get<int64_t>();
    step = in.meta().at("step").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(concat("checkpoint ", in.where(), ": the loader position lacks a field or has a wrong type: ",
                           e.what()));
  }
  require(epoch >= 0 && step >= 0 && step < steps_per_epoch(),
          concat("checkpoint ", in.where(), ": loader position (epoch ", epoch, ", step ", step, ") is outside ",
                 split_.name, " (", steps_per_epoch(), " steps per epoch)"));
  seek(epoch, step);
}

Batch ShardedLoader::next() {
  Batch b;
  if (opts_.prefetch <= 0) {
    b = make_batch(epoch_, step_);
  } else {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || error_; });
    if (queue_.empty()) std::rethrow_exception(error_);
    b = std::move(queue_.front());
    queue_.pop_front();
    cv_.notify_all();
  }
  if (++step_ == steps_per_epoch()) {
    step_ = 0;
    ++epoch_;
  }
  return b;
}

}  // namespace moeprune
