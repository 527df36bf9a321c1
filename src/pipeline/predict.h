// `moeprune predict`: a model's eval-mode output (no router noise) on images given
// as a NumPy array, written as .npy on rank 0. Any model source (pipeline/
// model_source.h), any number of ranks: the images are cut into global batches of
// data.eval_batch_size (rounded to whole routing groups on every rank), each rank
// runs its contiguous share, padding images are not routed, rank 0 gathers.
#pragma once
#include <string>

#include "core/config.h"
#include "dist/world.h"

namespace moeprune {

struct PredictOptions {
  std::string init;          // model source
  std::string images;        // .npy: uint8 or float32, NHWC or NCHW
  std::string out;           // logits .npy ("" = <images stem>.logits.npy beside the images)
  std::string ensemble_out;  // E3: ensemble log-probabilities ("" = <out stem>.ensemble.npy)
};

// Returns the exit code.
int run_predict(World& world, const JobConfig& cfg, const PredictOptions& opts);

}  // namespace moeprune
