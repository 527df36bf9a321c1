// Sharded, deterministic batches of a Split. Every step the global batch is cut
// into one contiguous slice per rank. Training order is a permutation drawn from
// (seed, epoch); augmentation randomness is drawn from (seed, epoch, step) for the
// whole global batch, so a batch is a pure function of (seed, epoch, step, rank,
// world) and the union over ranks does not depend on the world size. A background
// thread prepares the next batches while the caller computes.
#pragma once
#include <ATen/ATen.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "core/config.h"
#include "core/seed.h"
#include "core/state.h"
#include "data/dataset.h"

namespace moeprune {

struct Batch {
  at::Tensor images;  // [b, C, S, S] float, augmented and normalised, on the loader's device
  at::Tensor labels;  // [b] int64 task labels
  at::Tensor valid;   // [b] bool: false for the padding of the last evaluation batch
  int64_t epoch = 0, step = 0;
};

struct LoaderOptions {
  int64_t global_batch = 64;
  int rank = 0, world = 1;
  uint64_t seed = 0;
  bool train = true;          // shuffle, augment, drop the last partial batch; else in order, padded
  AugmentConfig augment;
  int image_size = 28;        // model resolution: images are resized when they differ
  int channels = 1;           // model channels: grey images are repeated to 3 channels when needed
  int prefetch = 2;
  c10::Device device{c10::kCPU};
};

// A checkpoint state owner (section "loader"): the position of the next batch.
class ShardedLoader final : public StateOwner {
 public:
  ShardedLoader(Split split, LoaderOptions opts);
  ~ShardedLoader();
  ShardedLoader(const ShardedLoader&) = delete;
  ShardedLoader& operator=(const ShardedLoader&) = delete;

  // Training: floor(N / B) full batches; evaluation: ceil(N / B), the last padded.
  int64_t steps_per_epoch() const;
  // The next call to next() returns the batch at (epoch, step).
  void seek(int64_t epoch, int64_t step);
  // Returns the batch at the current position and advances (into the next epoch after the last step).
  Batch next();
  // (epoch, step) of the batch the next call to next() returns.
  std::pair<int64_t, int64_t> position() const { return {epoch_, step_}; }
  // Pure: the batch this rank gets at (epoch, step).
  Batch make_batch(int64_t epoch, int64_t step) const;
  // vmoe's inception_crop (+ flip) for this rank's images x [b, C, h, w] -> [b, C, S, S].
  at::Tensor inception_crop(const at::Tensor& x, int64_t epoch, int64_t step) const;

  std::string state_key() const override { return "loader"; }
  void save_state(StateWriter& out) const override;
  void load_state(const StateReader& in) override;
  const Split& split() const { return split_; }
  const LoaderOptions& options() const { return opts_; }

 private:
  void start_prefetch();
  void stop_prefetch();
  std::vector<int64_t> order(int64_t epoch) const;

  Split split_;
  LoaderOptions opts_;
  int64_t epoch_ = 0, step_ = 0;
  // prefetch state
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;
  std::exception_ptr error_;
  bool stop_ = false;
};


}  // namespace moeprune
