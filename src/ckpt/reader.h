// Reading sharded checkpoints on any number of ranks: each state owner gets its
// manifest section and its tensors; experts are read by (block, original id) from
// whichever shard holds them, so the placement at save does not matter. Every file
// a rank opens is checked against the manifest's size and CRC-32 first: corrupt
// data is never loaded.
#pragma once
#include <vector>

#include "ckpt/manifest.h"
#include "core/state.h"

namespace moeprune {

// Every rank: loads each owner from m. UserError naming the file, tensor or
// section on any mismatch; owners may have been changed partially by then.
void load_checkpoint(const Manifest& m, const std::vector<StateOwner*>& owners);

}  // namespace moeprune
