// Test helper: rank 1 throws while the other ranks wait in a collective. The job
// must end on every rank with rank 1's message (the abort path), never hang.
#include "core/error.h"
#include "dist/world.h"

int main(int argc, char** argv) {
  moeprune::World world(&argc, &argv, /*use_gpus=*/false);
  return moeprune::run_ranks(world, [](moeprune::World& w) {
    if (w.rank() == 1) throw std::runtime_error("probe failure raised on rank 1");
    w.host_comm().barrier();  // never completes: rank 1 is gone
    return 0;
  });
}
