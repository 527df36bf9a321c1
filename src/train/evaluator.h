// Evaluation over a whole split on every rank: top-1 accuracy and loss of the
// (E3: ensemble) prediction, and per-expert load. Collective.
#pragma once
#include <map>

#include "data/loader.h"
#include "dist/world.h"
#include "model/vit.h"

namespace moeprune {

struct EvalResult {
  double loss = 0;      // mean negative log-likelihood of the (ensemble) prediction
  double accuracy = 0;  // top-1, in [0, 1]
  int64_t count = 0;    // examples evaluated (padding excluded)
  RoutingStats load;  // summed over ranks
};

// loader must be an evaluation loader (train = false). Restores the model's mode.
// max_batches > 0 stops early (calibration); top_k > 0 routes with that many experts.
EvalResult evaluate(VisionTransformer& model, ShardedLoader& loader, Comms comms, int64_t max_batches = 0,
                    int top_k = 0);

}  // namespace moeprune
