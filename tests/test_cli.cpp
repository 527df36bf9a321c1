// The command line under mpirun: bad input gives a clear one-line error on every
// rank and exit code 2, an exception on one rank ends every rank (no hang), and
// the forward smoke prints the same figures for 1, 2 and 4 ranks.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <regex>
#include <string>

#include "test_tmp.h"

namespace {

struct Result {
  int code;
  std::string out;
};

// The launcher and binaries the build names, unless MOEPRUNE_TEST_MPIEXEC, MOEPRUNE_TEST_BIN
// and MOEPRUNE_TEST_ABORT_PROBE say otherwise (a build copied to another machine: launch/gpu_kit.sh pack).
std::string from_env(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}
const std::string kMpiexec = from_env("MOEPRUNE_TEST_MPIEXEC", MOEPRUNE_MPIEXEC);
const std::string kBin = from_env("MOEPRUNE_TEST_BIN", MOEPRUNE_BIN);
const std::string kAbortProbe = from_env("MOEPRUNE_TEST_ABORT_PROBE", MOEPRUNE_ABORT_PROBE);

// These tests are about the CPU path under MPI: GPUs are hidden, so that they also run
// on a node with fewer GPUs than ranks.
Result run(const std::string& args, int np) {
  const std::string cmd = "timeout 300 " + kMpiexec + " -x OMP_NUM_THREADS=1 -x CUDA_VISIBLE_DEVICES= -np " +
                          std::to_string(np) + " " + args + " 2>&1";
  Result r{-1, ""};
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), buf.size(), pipe)) r.out += buf.data();
  const int status = pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

void expect_user_error(const std::string& args, int np, const std::string& message) {
  const Result r = run(kBin + " " + args, np);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(message), std::string::npos) << r.out;
  for (int rank = 0; rank < np; ++rank)
    EXPECT_EQ(count(r.out, "[rank " + std::to_string(rank) + "/" + std::to_string(np) + "] error"), 1)
        << "rank " << rank << " must report the error once:\n" << r.out;
}

TEST(Cli, UnknownConfigKey) {
  expect_user_error("forward --set model.moe.topk=3", 2, "unknown key 'model.moe.topk'");
}

TEST(Cli, BadKernelModeIsAUserError) {
  const Result r = run("-x MOEPRUNE_KERNELS=fast " + kBin + " forward", 2);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("MOEPRUNE_KERNELS='fast': expected auto, on or off"), std::string::npos) << r.out;
  EXPECT_EQ(count(r.out, "error"), 2) << "each rank reports it once:\n" << r.out;
  const Result g = run("-x MOEPRUNE_EXPERT_GEMM=padded " + kBin + " forward", 2);
  EXPECT_EQ(g.code, 2) << g.out;
  EXPECT_NE(g.out.find("MOEPRUNE_EXPERT_GEMM='padded': expected auto, loop, grouped or batched"), std::string::npos)
      << g.out;
}

TEST(Cli, TopKLargerThanExperts) {
  expect_user_error("forward --set model.moe.top_k=17", 2, "model.moe.top_k=17 must be <=");
}

TEST(Cli, ExpertsNotDivisibleByMembers) {
  expect_user_error("forward --set model.moe.ensemble_size=3", 2, "must be divisible by model.moe.ensemble_size=3");
}

// Sizes that cannot fit: one line before anything is allocated (was an allocation
// failure with a C++ backtrace per rank, or the OOM killer).
TEST(Cli, ModelThatCannotFit) {
  expect_user_error("forward --set model.hidden=1000000", 2, "GiB available per rank");
  expect_user_error("forward --set model.image_size=1000000", 2, "is too large to be built");
}

// More ranks than experts run on a mesh (2 groups x 2 here, tests/ckpt_reshard.sh
// and the MPI oracles check the results); an expert-parallel size that cannot work
// is one line on every rank.
TEST(Cli, ExpertParallelThatCannotWork) {
  expect_user_error("forward --set model.moe.num_experts=2 --set parallel.expert_parallel=4", 4,
                    "parallel.expert_parallel=4 exceeds the 2 experts of a MoE layer");
  expect_user_error("forward --set parallel.expert_parallel=3", 4,
                    "parallel.expert_parallel=3 does not divide the world size 4");
  expect_user_error("forward --set parallel.expert_parallel=-1", 2, "parallel.expert_parallel=-1 must be >= 0");
}

TEST(Cli, WorldSizeDoesNotDivideGroups) {
  expect_user_error("forward", 3, "world size 3 does not divide the 8 routing groups");
}

TEST(Cli, MissingConfigFile) {
  expect_user_error("forward --config /nonexistent/x.yaml", 2, "cannot open '/nonexistent/x.yaml'");
}

TEST(Cli, MissingDataFiles) {
  moeprune::test::TempDir out("cli");
  expect_user_error(std::string("pretrain --config ") + MOEPRUNE_SOURCE_DIR +
                        "/configs/vmoe-tiny-fmnist.yaml --set data.root=/nonexistent/fmnist --set output.dir=" + out.path(),
                    2,
                    "found in '/nonexistent/fmnist'");
}

TEST(Cli, ClassOutsideTheDataset) {
  moeprune::test::TempDir out("cli");
  expect_user_error("pretrain --set pretrain.classes=[3,12] --set output.dir=" + out.path(), 2,
                    "pretrain.classes has class 12, but planted has classes 0..7");
}

TEST(Cli, BatchNotDivisibleByRanks) {
  expect_user_error("pretrain --set pretrain.batch_size=24", 2,
                    "world size 2 does not divide the 3 routing groups of a pretrain micro-batch");
}

TEST(Cli, FinetuneWithoutPretrainedModel) {
  expect_user_error("finetune --set output.dir=/nonexistent/run", 2, "run `moeprune pretrain` first");
}

TEST(Cli, RecipeConfigWithoutItsFiles) {
  expect_user_error(std::string("run --config ") + MOEPRUNE_SOURCE_DIR + "/configs/vmoe-s32-cifar10.yaml", 2,
                    "initial model 'data/pretrained/vmoe_s32_last2_ilsvrc2012_randaug_light1' does not exist (neither "
                    "a model file nor a vmoe checkpoint prefix");
}

TEST(Cli, ExceptionOnOneRankEndsAllRanks) {
  const Result r = run(kAbortProbe, 2);
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: a rank hung\n" << r.out;
  EXPECT_NE(r.out.find("[rank 1/2] error: fatal: probe failure raised on rank 1"), std::string::npos) << r.out;
}

// The smoke command's figures are the same for 1, 2 and 4 ranks.
TEST(Cli, ForwardFiguresEqualAcrossWorldSizes) {
  auto figures = [](int np) {
    const Result r = run(kBin + " forward", np);
    EXPECT_EQ(r.code, 0) << r.out;
    std::string keep;
    std::regex line(R"(^(loss|output|dense grad|expert grad)[^\n]*$)", std::regex::multiline);
    for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), line); it != std::sregex_iterator(); ++it)
      keep += it->str() + "\n";
    std::string rows;  // per-expert rows without the rank grouping
    std::regex cell(R"(e(\d+)=(\d+))");
    for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), cell); it != std::sregex_iterator(); ++it)
      rows += it->str() + " ";
    EXPECT_EQ(count(keep, "\n"), 7) << r.out;
    return keep + rows;
  };
  const std::string one = figures(1);
  EXPECT_EQ(figures(2), one);
  EXPECT_EQ(figures(4), one);
}

}  // namespace
