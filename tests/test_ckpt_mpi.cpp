// Sharded checkpoints on W ranks: every tensor and optimiser state round-trips,
// and a run stopped at a checkpoint and resumed on the same world size ends
// bit-identical to the uninterrupted run.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "ckpt/manifest.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "ckpt/tools.h"
#include "ckpt/writer.h"
#include "model/model_state.h"
#include "prune/router_history.h"
#include "train/trainer.h"
#include "test_models.h"
#include "test_tmp.h"
#include "test_world.h"

namespace moeprune::test {
namespace {

JobConfig small_job() {
  JobConfig job;
  job.seed = 7;
  job.model = small_vit(4, 4, 2);
  job.data.dataset = DatasetKind::Planted;
  job.data.planted_train = 256;
  job.data.planted_test = 64;
  job.data.prefetch = 0;
  PhaseConfig p;
  p.optimizer = OptimizerKind::AdamW;  // both moments are saved and restored
  p.lr = 0.01;
  p.warmup_steps = 2;
  p.steps = 8;
  p.batch_size = 8;
  p.log_every = 1;
  job.finetune = p;
  return job;
}

struct Run {
  VisionTransformer model{nullptr};
  std::unique_ptr<Trainer> trainer;
  std::unique_ptr<ShardedLoader> train, val;
  MetricsSink sink;
};

// init_seed: the model's initial weights (the job seed drives data order and noise).
// replicas: hot-expert replicas in every MoE layer (replicated(), W >= 2).
std::unique_ptr<Run> make_run(const JobConfig& job, uint64_t init_seed, bool replicas = false) {
  auto r = std::make_unique<Run>();
  auto data = load_dataset(job, SplitPart::Train);
  LoaderOptions lo;
  lo.image_size = 8;
  lo.seed = job.seed;
  lo.global_batch = job.finetune.batch_size;
  lo.rank = g_world->rank();
  lo.world = g_world->size();
  lo.prefetch = 0;
  r->train = std::make_unique<ShardedLoader>(make_split(data, job.finetune, "finetune", SplitPart::Train, 0.25), lo);
  lo.train = false;
  lo.global_batch = 16;
  r->val = std::make_unique<ShardedLoader>(make_split(data, job.finetune, "finetune", SplitPart::Val, 0.25), lo);
  at::manual_seed(init_seed);
  std::vector<Placement> pls = default_placements(job.model, g_world->size());
  if (replicas)
    for (auto& pl : pls) pl = replicated(job.model.moe.num_experts, g_world->size());
  r->model = VisionTransformer(job.model, pls, g_world->comm(), init_seed);
  r->trainer = std::make_unique<Trainer>(g_world->comms(), job, job.finetune, Phase::Finetune, r->model, r->sink);
  return r;
}

// With hot-expert replicas: each expert is written once (by its primary copy), the
// layout keeps the replicas, and the checkpoint loads on the same placement and on
// one without replicas (every copy takes the expert's tensors).
TEST(CheckpointMpi, ReplicasAreWrittenOnceAndLoadAnywhere) {
  if (g_world->size() < 2) GTEST_SKIP() << "replicas need two ranks";
  const JobConfig job = small_job();
  test::TempDir tmp("mpi-ckpt-rep", g_world->host_comm());
  const std::string root = tmp / "checkpoints";
  auto a = make_run(job, job.seed, /*replicas=*/true);
  a->trainer->run(*a->train, *a->val, nullptr);
  CheckpointWriter w(g_world->comms(), root, 2, false);
  ModelState a_state(a->model);
  w.save({&a_state, &a->trainer->optimizer()}, "finetune", 8, job.resolved_yaml);
  const Manifest m = read_manifest(latest_checkpoint(root));
  EXPECT_NO_THROW(verify_checkpoint(m.dir));
  for (int block : job.model.moe_blocks()) {
    std::vector<int> listed;
    for (const auto& s : m.shards)
      if (s.experts.count(block)) listed.insert(listed.end(), s.experts.at(block).begin(), s.experts.at(block).end());
    std::sort(listed.begin(), listed.end());
    EXPECT_EQ(listed, (std::vector<int>{0, 1, 2, 3})) << "block " << block << ": every expert exactly once";
  }
  const ModelLayout layout = layout_from_json(m.section("model"), m.dir);
  const auto pls = placements_of(layout, g_world->size());
  EXPECT_EQ(pls[0].expert_ranks(), replicated(4, g_world->size()).expert_ranks());

  auto expect_loaded = [&](test::Run& b) {
    auto pa = a->model->named_parameters();
    auto& sa = a->trainer->optimizer().slots();
    auto& sb = b.trainer->optimizer().slots();
    for (size_t i = 0; i < sb.size(); ++i) {
      const std::string& name = sb[i].name;
      at::Tensor want = pa[name], m1 = sa[i].m1, m2 = sa[i].m2;
      if (sb[i].expert) {  // a's rows of the experts b holds (a's copies are identical)
        std::vector<int64_t> rows;
        int64_t held = 0;
        for (int id : sb[i].expert_ids) {
          const auto it = std::find(sa[i].expert_ids.begin(), sa[i].expert_ids.end(), id);
          rows.push_back(it == sa[i].expert_ids.end() ? -1 : it - sa[i].expert_ids.begin());
          held += rows.back() >= 0;
        }
        if (held != static_cast<int64_t>(rows.size())) continue;  // compared on the ranks holding them all
        const at::Tensor idx = at::tensor(rows, at::kLong);
        want = want.index_select(0, idx);
        m1 = m1.index_select(0, idx);
        m2 = m2.index_select(0, idx);
      }
      EXPECT_TRUE(at::equal(sb[i].param, want)) << name;
      EXPECT_TRUE(at::equal(sb[i].m1, m1)) << name;
      EXPECT_TRUE(at::equal(sb[i].m2, m2)) << name;
    }
  };
  auto same = make_run(job, 99, /*replicas=*/true);
  ModelState same_state(same->model);
  load_checkpoint(m, {&same_state, &same->trainer->optimizer()});
  expect_loaded(*same);
  auto plain = make_run(job, 99);
  ModelState plain_state(plain->model);
  load_checkpoint(m, {&plain_state, &plain->trainer->optimizer()});
  expect_loaded(*plain);
  // Training kept the copies identical: each rank's copy of expert 0 equals rank 0's.
  for (const auto& item : a->model->named_parameters()) {
    if (!is_expert_param(item.key())) continue;
    const auto& ids = local_expert_ids(a->model, block_of_param(item.key()));
    const int64_t row = std::find(ids.begin(), ids.end(), 0) - ids.begin();
    ASSERT_LT(row, static_cast<int64_t>(ids.size()));
    at::Tensor mine = item.value()[row].detach().clone(), first = mine.clone();
    g_world->host_comm().broadcast(first, 0);
    EXPECT_TRUE(at::equal(mine, first)) << item.key() << ": the copies of expert 0 drifted apart";
  }
}

TEST(CheckpointMpi, EveryTensorRoundTrips) {
  const JobConfig job = small_job();
  test::TempDir tmp("mpi-ckpt-rt", g_world->host_comm());
  const std::string root = tmp / "checkpoints";
  auto a = make_run(job, job.seed);
  a->trainer->run(*a->train, *a->val, nullptr);  // optimiser state exists now
  CheckpointWriter w(g_world->comms(), root, 2, false);
  RouterHistory h;
  h.snapshot(a->model);
  ModelState a_state(a->model);
  w.save({&a_state, &a->trainer->optimizer(), &h}, "finetune", 8, job.resolved_yaml);

  auto b = make_run(job, 99);  // other initial weights: everything must come from the file
  RouterHistory hb;
  const Manifest m = read_manifest(latest_checkpoint(root));
  EXPECT_EQ(m.world_size, g_world->size());
  ModelState b_state(b->model);
  load_checkpoint(m, {&b_state, &b->trainer->optimizer(), &hb});
  EXPECT_EQ(m.step, 8);
  auto pb = b->model->named_parameters();
  for (const auto& it : a->model->named_parameters()) EXPECT_TRUE(at::equal(it.value(), pb[it.key()])) << it.key();
  auto& sa = a->trainer->optimizer().slots();
  auto& sb = b->trainer->optimizer().slots();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    ASSERT_TRUE(sb[i].m1.defined() && sb[i].m2.defined()) << sa[i].name;
    EXPECT_TRUE(at::equal(sa[i].m1, sb[i].m1)) << sa[i].name;
    EXPECT_TRUE(at::equal(sa[i].m2, sb[i].m2)) << sa[i].name;
  }
  EXPECT_EQ(b->trainer->optimizer().steps_taken(), a->trainer->optimizer().steps_taken());
  for (const auto& [block, ref] : h.reference()) EXPECT_TRUE(at::equal(ref, hb.reference().at(block)));
}

TEST(CheckpointMpi, ResumeIsBitIdenticalToUninterrupted) {
  const JobConfig job = small_job();
  test::TempDir tmp("mpi-ckpt-resume", g_world->host_comm());
  const std::string root = tmp / "checkpoints";
  auto full = make_run(job, job.seed);
  const PhaseResult want = full->trainer->run(*full->train, *full->val, nullptr);

  // Stop after step 3 with a checkpoint.
  auto first = make_run(job, job.seed);
  CheckpointWriter w(g_world->comms(), root, 2, /*async=*/true);  // the asynchronous writer, finished at stop
  TrainHooks hooks;
  ModelState s1(first->model);
  hooks.after_step = [&](int64_t step) {
    if (step != 3) return false;
    w.save({&s1, &first->trainer->optimizer(), first->train.get()}, "finetune", step, job.resolved_yaml);
    w.poll(true);
    return true;
  };
  const PhaseResult stopped = first->trainer->run(*first->train, *first->val, nullptr, hooks);
  EXPECT_TRUE(stopped.stopped);
  EXPECT_EQ(stopped.steps, 3);

  auto second = make_run(job, 1234);  // the initial weights of the resumed process must not matter
  const Manifest m = read_manifest(latest_checkpoint(root));
  ModelState s2(second->model);
  load_checkpoint(m, {&s2, &second->trainer->optimizer(), second->train.get()});
  const PhaseResult got = second->trainer->run(*second->train, *second->val, nullptr, {}, m.step);

  EXPECT_EQ(got.train_loss, want.train_loss);
  EXPECT_EQ(got.val.loss, want.val.loss);
  auto pf = full->model->named_parameters();
  for (const auto& it : second->model->named_parameters())
    EXPECT_TRUE(at::equal(it.value(), pf[it.key()])) << it.key();
}

}  // namespace
}  // namespace moeprune::test
