// GoogleTest main for the multi-rank suite: one World for all tests. Ranks other
// than 0 print only failures, so the log reads like a single run.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "test_world.h"

namespace moeprune::test {
World* g_world = nullptr;
}

int main(int argc, char** argv) {
  // The suite runs on CPUs (its oracles build models on host tensors); with
  // MOEPRUNE_TEST_GPUS=1 the World takes the GPU (NCCL device communicator) for
  // the tests that exercise the device path (Mesh.*, GradBuckets.*; launch/gpu_check.sh).
  const char* gpus = std::getenv("MOEPRUNE_TEST_GPUS");
  moeprune::World world(&argc, &argv, /*use_gpus=*/gpus != nullptr && std::string(gpus) == "1");
  moeprune::test::g_world = &world;
  if (world.rank() != 0) GTEST_FLAG_SET(brief, true);  // before InitGoogleTest, which picks the printer
  ::testing::InitGoogleTest(&argc, argv);
  at::set_num_threads(1);
  const int rc = RUN_ALL_TESTS();
  // A test that failed on any rank fails the job on every rank.
  const bool ok = world.all_ok(rc == 0);
  return ok ? 0 : 1;
}
