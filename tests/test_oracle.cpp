// The oracle (invariant 1 and 2 of ARCHITECTURE.md): an MoE layer and the whole
// model run expert-parallel on W ranks give the outputs, loss and gradients of one
// process routing the same groups of the same global batch; relative error
// <= 1e-5 in float32. The reference is built on every rank with a
// SelfCommunicator, so each rank checks its own slice.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <map>

#include "core/config.h"
#include "core/precision.h"
#include "dist/mesh.h"
#include "dist/node_memory.h"
#include "model/vit.h"
#include "train/trainer.h"
#include "test_models.h"
#include "test_world.h"

namespace moeprune::test {
namespace {

constexpr double kTol = 1e-5;

ModelConfig small_config(int experts, int top_k, int members, bool bpr) {
  ModelConfig m;
  m.name = "oracle";
  m.image_size = 8;
  m.channels = 2;
  m.patch_size = 4;  // 4 patches + class token
  m.hidden = 16;
  m.mlp_dim = 24;
  m.num_layers = 4;
  m.num_heads = 2;
  m.num_classes = 5;
  m.moe.num_experts = experts;
  m.moe.top_k = top_k;
  m.moe.every = members > 1 ? 0 : 2;
  m.moe.last = members > 1 ? 2 : 0;
  m.moe.group_size = 2;
  m.moe.capacity_factor = 0.9;  // some choices are dropped: exercised too
  m.moe.bpr = bpr;
  m.moe.ensemble_size = members;
  return m;
}

// Experts scattered over ranks (not contiguous), so placement is exercised.
Placement scattered(int E, int W) {
  std::vector<int> ranks(E);
  for (int e = 0; e < E; ++e) ranks[e] = (e * 3 + 1) % W;
  return Placement(ranks, W);
}

at::Tensor fixed(std::vector<int64_t> shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::kFloat);
}

struct LayerCase {
  int experts, top_k, members;
  bool bpr, scatter;
};

// Every case with every dispatcher backend for the distributed layer (the
// reference routes with torch ops): the backends' contract across ranks.
class MoeLayerOracle : public ::testing::TestWithParam<std::tuple<LayerCase, DispatcherKind>> {};

TEST_P(MoeLayerOracle, MatchesSingleProcess) {
  const LayerCase c = std::get<0>(GetParam());
  const DispatcherKind backend = std::get<1>(GetParam());
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  const ModelConfig cfg = small_config(c.experts, c.top_k, c.members, c.bpr);
  const int64_t groups_per_rank = 2, B = W * groups_per_rank * cfg.moe.group_size, T = 5, H = cfg.hidden;
  const int64_t local_B = B / W;
  const int M = c.members;

  // Global input [M*B, T, H] member-major; rank r owns images [r*local_B, (r+1)*local_B) of every member.
  at::Tensor x_all = fixed({M * B, T, H}, 11);
  at::Tensor probe = fixed({M * B, T, H}, 12);
  auto local_rows = [&](const at::Tensor& t) {
    std::vector<at::Tensor> parts;
    for (int m = 0; m < M; ++m) parts.push_back(t.narrow(0, m * B + r * local_B, local_B));
    return at::cat(parts, 0);
  };

  SelfCommunicator self;
  at::manual_seed(5);
  MoeLayer ref(cfg, 1, Placement::contiguous(c.experts, 1), self, 77);
  at::manual_seed(5);
  Placement pl = c.scatter ? scattered(c.experts, W) : Placement::contiguous(c.experts, W);
  MoeLayer dist(cfg, 1, pl, w.host_comm(), 77);

  ForwardContext rc;
  rc.in.train = true;
  rc.in.noise_seed = 3;
  rc.in.total_groups = B / cfg.moe.group_size;
  at::Tensor xr = x_all.clone().requires_grad_(true);
  at::Tensor yr = ref->forward(xr, rc);
  ((yr * probe).sum() + rc.aux_loss).backward();

  ForwardContext dc = rc;
  dc.aux_loss = at::Tensor();
  dc.in.first_group = r * local_B / cfg.moe.group_size;
  at::Tensor xd = local_rows(x_all).requires_grad_(true);
  dist->set_runtime({backend, ExpertGemm::Loop});
  at::Tensor yd = dist->forward(xd, dc);
  ((yd * local_rows(probe)).sum() + dc.aux_loss).backward();

  EXPECT_LE(rel_err(yd, local_rows(yr)), kTol) << "outputs";
  EXPECT_LE(rel_err(xd.grad(), local_rows(xr.grad())), kTol) << "input gradients";
  at::Tensor aux = dc.aux_loss.detach().reshape({1}).clone();
  w.host_comm().all_reduce(aux, ReduceOp::Sum);
  EXPECT_LE(rel_err(aux, rc.aux_loss.detach().reshape({1})), kTol) << "auxiliary loss";
  for (int m = 0; m < M; ++m) {
    at::Tensor g = dist->routers[m]->as<RouterImpl>()->weight.grad().clone();
    w.host_comm().all_reduce(g, ReduceOp::Sum);
    EXPECT_LE(rel_err(g, ref->routers[m]->as<RouterImpl>()->weight.grad()), kTol) << "router " << m;
  }
  const auto& ids = dist->experts->expert_ids();
  ASSERT_EQ(ids, pl.local_experts(r));
  at::Tensor idx = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong);
  EXPECT_TRUE(at::equal(dist->experts->w1.detach(), ref->experts->w1.detach().index_select(0, idx)))
      << "experts are initialised independently of placement";
  for (auto [d, s] : {std::pair{dist->experts->w1, ref->experts->w1}, {dist->experts->b1, ref->experts->b1},
                      {dist->experts->w2, ref->experts->w2}, {dist->experts->b2, ref->experts->b2}}) {
    ASSERT_TRUE(d.grad().defined());
    EXPECT_LE(rel_err(d.grad(), s.grad().index_select(0, idx)), kTol) << "expert gradients";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeLayerOracle,
                         ::testing::Combine(::testing::Values(LayerCase{8, 2, 1, false, false},
                                                              LayerCase{8, 2, 1, true, true},
                                                              LayerCase{4, 1, 1, false, true},
                                                              LayerCase{8, 1, 2, true, false},
                                                              LayerCase{8, 2, 2, false, true},
                                                              LayerCase{8, 1, 2, false, false}),
                                            ::testing::Values(DispatcherKind::Torch, DispatcherKind::Kernels)));

// One MoE layer call, forward (and backward when trained) on one rank: what the
// identical-results tests below compare.
struct LayerRun {
  at::Tensor y, gx;
  std::vector<at::Tensor> grads;
};

// One call of `layer` on x0 (a rank's rows of groups [first_group, ...) out of
// total_groups), under autocast in bf16 when asked; with train, backward of
// <y, probe> + the auxiliary loss, keeping the input and parameter gradients.
LayerRun run_layer(MoeLayer& layer, const at::Tensor& x0, const at::Tensor& probe, bool train, bool bf16,
                   int64_t total_groups, int64_t first_group, MoeTimers* timers = nullptr) {
  LayerRun out;
  ForwardContext ctx;
  ctx.in.train = train;
  ctx.in.noise_seed = 3;
  ctx.in.total_groups = total_groups;
  ctx.in.first_group = first_group;
  ctx.probes.timers = timers;
  at::Tensor x = x0.clone().requires_grad_(train);
  {
    AutocastGuard amp(x.device(), bf16 ? Precision::Bf16 : Precision::Fp32);
    out.y = layer->forward(x, ctx);
  }
  if (!train) return out;
  ((out.y.to(at::kFloat) * probe).sum() + ctx.aux_loss).backward();
  out.gx = x.grad();
  for (const auto& p : layer->parameters()) out.grads.push_back(p.grad().defined() ? p.grad() : at::Tensor());
  return out;
}

// Outputs bit for bit; with train also the input gradients and every parameter's.
void expect_same_bits(const LayerRun& a, const LayerRun& b, bool train, const std::string& what) {
  EXPECT_TRUE(at::equal(a.y, b.y)) << what << ": outputs";
  if (!train) return;
  EXPECT_TRUE(at::equal(a.gx, b.gx)) << what << ": input gradients";
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) {
    ASSERT_EQ(a.grads[i].defined(), b.grads[i].defined()) << what << ": parameter " << i;
    if (a.grads[i].defined()) {
      EXPECT_TRUE(at::equal(a.grads[i], b.grads[i])) << what << ": gradient of parameter " << i;
    }
  }
}

// runtime.dispatch_chunks: the exchange overlapped with the experts gives the same
// bits as one exchange then the experts (outputs, input, router and expert
// gradients), float32 and bf16, every chunk count, experts per rank 1 to 8; and the
// overlapped path is the one that ran.
struct PipeCase {
  int experts, top_k, members;
  bool bf16;
};
class PipelinedExperts : public ::testing::TestWithParam<PipeCase> {};

TEST_P(PipelinedExperts, IdenticalToOneExchange) {
  const PipeCase c = GetParam();
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  if (W == 1) GTEST_SKIP() << "one rank has nothing to overlap";
  ModelConfig cfg = small_config(c.experts, c.top_k, c.members, true);
  cfg.moe.capacity_factor = 1.1;
  const int64_t local_B = 3 * cfg.moe.group_size, T = 5, H = cfg.hidden;
  const int M = c.members;
  at::Tensor x0 = fixed({M * local_B, T, H}, 21 + static_cast<uint64_t>(r));
  at::Tensor probe = fixed({M * local_B, T, H}, 41 + static_cast<uint64_t>(r));
  const Placement pl = scattered(c.experts, W);

  struct Run : LayerRun {
    MoeTimers timers;
  };
  const auto run = [&](int chunks, bool train) {
    at::manual_seed(5);
    MoeLayer layer(cfg, 1, pl, w.host_comm(), 77);
    layer->set_runtime({DispatcherKind::Kernels, ExpertGemm::Loop, chunks});
    Run out;
    static_cast<LayerRun&>(out) = run_layer(layer, x0, probe, train, c.bf16, W * local_B / cfg.moe.group_size,
                                            r * local_B / cfg.moe.group_size, &out.timers);
    return out;
  };
  const int most = (c.experts + W - 1) / W;
  for (bool train : {true, false}) {
    const Run one = run(1, train);
    EXPECT_EQ(one.timers.pipelined, 0);
    for (int chunks : {2, 3, most + 1}) {
      const Run piped = run(chunks, train);
      EXPECT_EQ(piped.timers.pipelined, 1) << chunks << " chunks: the overlapped path did not run";
      expect_same_bits(piped, one, train, std::to_string(chunks) + " chunks, train " + std::to_string(train));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, PipelinedExperts,
                         ::testing::Values(PipeCase{8, 2, 1, false}, PipeCase{16, 1, 1, false},
                                           PipeCase{8, 2, 2, false}, PipeCase{16, 2, 1, true},
                                           PipeCase{4, 1, 1, true}));

// The exchange through node memory (dist/node_memory.h; senders write rows into
// the receiver's buffer, the combine reads the other ranks' expert outputs in
// place) against the same layer exchanging through MPI: outputs, input, router and
// expert gradients bit for bit, fp32 and bf16, train and eval. Also where rows are
// not in node memory: experts that write their outputs elsewhere (batched), no room
// left in node memory (every pair through MPI), room on rank 0 only (pairs of both
// kinds in one exchange).
struct NodeCase {
  int experts, top_k;
  bool bf16;
};
class NodeMemoryExchange : public ::testing::TestWithParam<NodeCase> {};

TEST_P(NodeMemoryExchange, IdenticalToMpi) {
  const NodeCase c = GetParam();
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  if (W == 1) GTEST_SKIP() << "one rank exchanges nothing";
  ModelConfig cfg = small_config(c.experts, c.top_k, 1, true);
  cfg.moe.capacity_factor = 1.1;
  const int64_t local_B = 3 * cfg.moe.group_size, T = 5, H = cfg.hidden;
  at::Tensor x0 = fixed({local_B, T, H}, 23 + static_cast<uint64_t>(r));
  at::Tensor probe = fixed({local_B, T, H}, 43 + static_cast<uint64_t>(r));
  const Placement pl = scattered(c.experts, W);

  struct Run : LayerRun {
    size_t node_peak = 0;
  };
  // node: whether the communicator may make node memory; limit: its bytes (-1: all).
  const auto run = [&](bool node, ExpertGemm gemm, bool train, int64_t limit) {
    MPI_Comm dup;
    MPI_Comm_dup(w.host_comm().handle(), &dup);
    Run out;
    {
      set_node_memory_enabled(node);
      MpiCommunicator comm(dup);
      const std::shared_ptr<NodeMemory> m = comm.node_memory();  // collective: made here, used by the layer
      set_node_memory_enabled(true);
      EXPECT_EQ(m != nullptr, node) << "node memory on one node of same-user processes";
      if (m && limit >= 0) m->set_limit(static_cast<size_t>(limit));
      at::manual_seed(5);
      MoeLayer layer(cfg, 1, pl, comm, 77);
      layer->set_runtime({DispatcherKind::Kernels, gemm, 1});
      static_cast<LayerRun&>(out) = run_layer(layer, x0, probe, train, c.bf16, W * local_B / cfg.moe.group_size,
                                              r * local_B / cfg.moe.group_size);
      if (m) out.node_peak = m->peak();
    }
    MPI_Comm_free(&dup);
    return out;
  };
  for (bool train : {true, false}) {
    for (ExpertGemm gemm : {ExpertGemm::Loop, ExpertGemm::Batched}) {
      const std::string what = std::string(train ? "train" : "eval") + ", rank 0 " + str(gemm);
      const Run mpi = run(false, gemm, train, -1);
      const Run node = run(true, gemm, train, -1);
      EXPECT_GT(node.node_peak, 0u) << what << ": node memory was not used";
      expect_same_bits(node, mpi, train, what);
      // No room at all: every row through MPI; room on rank 0 only: pairs of both kinds.
      expect_same_bits(run(true, gemm, train, 0), mpi, train, what + ", no room");
      expect_same_bits(run(true, gemm, train, r == 0 ? -1 : 0), mpi, train, what + ", room on rank 0 only");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, NodeMemoryExchange,
                         ::testing::Values(NodeCase{8, 2, false}, NodeCase{16, 1, false}, NodeCase{8, 2, true}));

// One training forward + backward of the whole model: on every rank its slice of a
// fixed global batch with placement `per_layer` in every MoE block (over the mesh's
// N positions), and in one process on all of it (the reference, built on every rank
// with a SelfCommunicator). Checks the logits and the summed loss; returns both
// models for their gradients.
std::pair<VisionTransformer, VisionTransformer> whole_model(const Comms& c, int members, const Placement& per_layer) {
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  const ModelConfig cfg = small_config(8, members > 1 ? 1 : 2, members, members == 1);
  const int64_t B = W * 2 * cfg.moe.group_size, local_B = B / W;
  const int64_t groups = B / cfg.moe.group_size;
  at::Tensor images = fixed({B, cfg.channels, cfg.image_size, cfg.image_size}, 31);
  at::Tensor labels = at::arange(B, at::kLong).remainder(cfg.num_classes);
  auto run = [&](VisionTransformer& model, const at::Tensor& im, const at::Tensor& lb, int64_t first_group) {
    ForwardContext ctx;
    ctx.in.train = true;
    ctx.in.noise_seed = 4;
    ctx.in.first_group = first_group;
    ctx.in.total_groups = groups;
    at::Tensor logits = model->forward(im, ctx);
    at::Tensor loss = cross_entropy_sum(logits, lb) / static_cast<double>(B) +
                      ctx.aux_loss / static_cast<double>(members * groups);
    loss.backward();
    return std::pair{logits, loss};
  };
  static SelfCommunicator self;
  at::manual_seed(1);
  VisionTransformer ref(cfg, default_placements(cfg, 1), self, 5);
  at::manual_seed(1);
  VisionTransformer dist(cfg, std::vector<Placement>(cfg.moe_blocks().size(), per_layer), c.ep(), 5);
  auto [ref_logits, ref_loss] = run(ref, images, labels, 0);
  auto [logits, loss] =
      run(dist, images.narrow(0, r * local_B, local_B), labels.narrow(0, r * local_B, local_B), r * 2);
  EXPECT_LE(rel_err(logits, ref_logits.narrow(1, r * local_B, local_B)), kTol) << "logits";
  at::Tensor l = loss.detach().reshape({1}).clone();
  w.host_comm().all_reduce(l, ReduceOp::Sum);
  EXPECT_LE(rel_err(l, ref_loss.detach().reshape({1})), kTol) << "loss";
  return {ref, dist};
}

// The whole model (V-MoE with BPR, and E3), expert-parallel over all ranks and on
// every process mesh W = D x N (dist/mesh.h): each rank routes its own slice,
// tokens move inside its expert-parallel group only, an expert's gradient is the
// sum over its replicas (expert-data-parallel group). Parameters: N and the E3
// members; the cases run are the divisors of the world size: (D, N) = (4,1), (2,2),
// (1,4) on 4 ranks, (2,1), (1,2) on 2, (1,1) on 1. Experts are scattered over the
// group's positions, so placement is exercised.
class ModelOracle : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(ModelOracle, MatchesSingleProcess) {
  World& w = *g_world;
  const int W = w.size(), r = w.rank();
  const auto [N, members] = GetParam();
  if (W % N != 0) GTEST_SKIP() << N << " does not divide " << W;
  Mesh mesh(w.host_comm(), w.host_comm(), N);
  const Comms c = mesh.comms();
  ASSERT_EQ(c.ep_size(), N);
  ASSERT_EQ(c.groups(), W / N);
  ASSERT_EQ(c.ep_rank(), r % N);
  const Placement pl = scattered(8, N);
  auto [ref, dist] = whole_model(c, members, pl);
  auto rn = ref->named_parameters();
  int experts_checked = 0;
  for (const auto& item : dist->named_parameters()) {
    const std::string& name = item.key();
    at::Tensor g = item.value().grad().defined() ? item.value().grad().clone() : at::zeros_like(item.value());
    at::Tensor rg = rn[name].grad();
    if (name.find(".experts.") == std::string::npos) {
      w.host_comm().all_reduce(g, ReduceOp::Sum);
      EXPECT_LE(rel_err(g, rg), kTol) << name;
      continue;
    }
    // Without the replicas' sum an expert's gradient covers one group's tokens only.
    if (c.edp_host) {
      at::Tensor own = g.clone();
      c.edp_host->all_reduce(g, ReduceOp::Sum);
      if (W / N > 1) {
        EXPECT_GT(rel_err(own, g), 1e-3) << name << ": the groups' parts are not all the same";
      }
    }
    const auto& ids = pl.local_experts(c.ep_rank());
    at::Tensor idx = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong);
    EXPECT_LE(rel_err(g, rg.index_select(0, idx)), kTol) << name;
    ++experts_checked;
  }
  EXPECT_GT(experts_checked, 0);
}

INSTANTIATE_TEST_SUITE_P(DxN, ModelOracle, ::testing::Combine(::testing::Values(1, 2, 4), ::testing::Values(1, 2)));

// Hot-expert replicas (prune.replicate): a replicated expert's tokens are split among
// its copies, so the outputs and loss are one process's; after the optimiser's
// gradient sum every copy holds the expert's whole gradient. (N, members); meshes
// with D > 1 where N < W.
class ReplicaOracle : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(ReplicaOracle, CopiesSplitTokensAndSumGradients) {
  World& w = *g_world;
  const auto [N, members] = GetParam();
  if (w.size() % N != 0) GTEST_SKIP() << N << " does not divide " << w.size();
  Mesh mesh(w.host_comm(), w.host_comm(), N);
  const Comms c = mesh.comms();
  const Placement pl = replicated(8, N);
  ASSERT_TRUE(pl.has_replicas());
  auto [ref, dist] = whole_model(c, members, pl);

  // The copies of expert 0 (on every rank) each computed part of its tokens only.
  std::map<std::string, at::Tensor> own;
  for (const auto& item : dist->named_parameters())
    if (item.value().grad().defined()) own[item.key()] = item.value().grad().clone();
  Optimizer opt(PhaseConfig{}, param_slots(dist));
  opt.sync_gradients(c);
  auto rn = ref->named_parameters();
  int64_t split_rows = 0;
  for (const auto& item : dist->named_parameters()) {
    const std::string& name = item.key();
    at::Tensor g = item.value().grad();
    at::Tensor rg = rn[name].grad();
    if (name.find(".experts.") == std::string::npos) {
      EXPECT_LE(rel_err(g, rg), kTol) << name;
      continue;
    }
    const auto& ids = local_expert_ids(dist, block_of_param(name));
    for (size_t i = 0; i < ids.size(); ++i) {
      const int64_t row = static_cast<int64_t>(i);
      EXPECT_LE(rel_err(g[row], rg[ids[i]]), kTol) << name << " expert " << ids[i];
      // A copy of expert 0 that computed only part of its tokens (the sum mattered).
      if (ids[i] == 0 && rel_err(own.at(name)[row], g[row]) > 1e-3) ++split_rows;
    }
  }
  at::Tensor split = at::tensor({split_rows}, at::kLong);
  w.host_comm().all_reduce(split, ReduceOp::Sum);
  EXPECT_GT(split.item<int64_t>(), 0) << "no copy of expert 0 computed part of its tokens: the test cannot fail";
}

INSTANTIATE_TEST_SUITE_P(DxN, ReplicaOracle, ::testing::Combine(::testing::Values(2, 4), ::testing::Values(1, 2)));

}  // namespace
}  // namespace moeprune::test
