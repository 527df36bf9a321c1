// The dispatcher kernels (kernels/) against the PyTorch-op oracle of src/model.
//
// Kernels.* run everywhere: they drive the kernels' element functions through the
// host path of model/fused_dispatch.cpp (the same code the CUDA grids run) and
// compare with router.cpp / dispatcher.cpp. Gpu.* launch the CUDA kernels and
// compare them with the host path; without a GPU they are skipped with a message
// (ctest lists them as the separate test "gpu_kernels", reported "Skipped").
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <optional>

#include <torch/autograd.h>

#include "kernels/dispatch_ops.h"
#include "model/fused_dispatch.h"
#include "model/expert_bank.h"
#include "model/router.h"
#include "model/vit.h"
#include "core/precision.h"

namespace moeprune {
namespace {

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item<double>();
}

TEST(Kernels, Bf16RoundingMatchesTorch) {
  at::manual_seed(1);
  at::Tensor f = at::cat({at::randn({20000}) * 100, at::randn({1000}) * 1e-30, at::randn({1000}) * 1e30,
                          at::tensor({0.f, -0.f, 1.f, 1.00390625f, 1.01171875f, 3.4e38f, -3.4e38f, INFINITY, -INFINITY})});
  at::Tensor ref = f.to(at::kBFloat16);
  const float* fp = f.data_ptr<float>();
  const auto* rp = reinterpret_cast<const uint16_t*>(ref.data_ptr());
  int bad = 0;
  for (int64_t i = 0; i < f.numel(); ++i) {
    const kernels::bf16 b = kernels::from_float<kernels::bf16>(fp[i]);
    bad += b.bits != rp[i];
    if (i < 1000) {
      EXPECT_EQ(kernels::to_float(b), ref[i].item<float>());
    }
  }
  EXPECT_EQ(bad, 0);
  const kernels::bf16 nan = kernels::from_float<kernels::bf16>(NAN);
  EXPECT_TRUE(std::isnan(kernels::to_float(nan)));
}

TEST(Kernels, TopkMatchesTorch) {
  at::manual_seed(2);
  for (int E : {4, 8, 32})
    for (int k : {1, 2, 4}) {
      at::Tensor probs = at::softmax(at::randn({3, 257, E}), -1);
      auto [ex, g] = fused_topk(probs, k);
      auto [rg, rex] = probs.topk(k, -1);
      EXPECT_TRUE(at::equal(ex, rex)) << "E=" << E << " k=" << k;
      EXPECT_TRUE(at::equal(g, rg)) << "E=" << E << " k=" << k;
    }
  // Ties go to the lower expert index, NaN is never preferred to a number.
  at::Tensor t = at::tensor({0.25f, 0.5f, 0.25f, NAN}).view({1, 4});
  auto [ex, g] = fused_topk(t, 2);
  EXPECT_EQ(ex[0][0].item<int64_t>(), 1);
  EXPECT_EQ(ex[0][1].item<int64_t>(), 0);
  EXPECT_THROW(fused_topk(t, 9), c10::Error);
}

TEST(Kernels, CapacityAssignmentMatchesOracle) {
  at::manual_seed(3);
  struct C {
    int64_t G, S;
    int K, E;
    double cf;
  };
  // Small groups, groups longer than 64 pieces of 64 choices (S*K > 4096), skewed routing.
  for (const C& c : {C{3, 10, 2, 4, 0.5}, C{2, 300, 1, 8, 1.05}, C{2, 3000, 2, 32, 0.5}, C{4, 65, 2, 8, 2.0}})
    for (bool bpr : {false, true}) {
      at::Tensor logits = at::randn({c.G, c.S, c.E});
      logits.select(2, 0).add_(1.0);  // expert 0 is popular: overflows its capacity
      at::Tensor probs = at::softmax(logits, -1);
      auto [gate, expert] = probs.topk(c.K, -1);
      const int64_t cap = expert_capacity(c.S, c.K, c.cf, c.E);
      auto [pos_ref, keep_ref] = assign_slots(expert, gate, c.E, cap, bpr);
      auto [pos, keep] = fused_assign_slots(expert, priority_order(gate, bpr), c.E, cap);
      EXPECT_TRUE(at::equal(pos, pos_ref)) << "S=" << c.S << " bpr=" << bpr;
      EXPECT_TRUE(at::equal(keep, keep_ref)) << "S=" << c.S << " bpr=" << bpr;
      EXPECT_LT(keep.sum().item<int64_t>(), keep.numel());  // capacity really dropped something
      // With invalid (padding) tokens: they take no slot and do not delay valid ones.
      at::Tensor valid = at::rand({c.G, c.S}) < 0.7;
      auto [pv_ref, kv_ref] = assign_slots(expert, gate, c.E, cap, bpr, valid);
      auto [pv, kv] = fused_assign_slots(expert, priority_order(gate, bpr, valid), c.E, cap, valid);
      EXPECT_TRUE(at::equal(pv, pv_ref)) << "masked, S=" << c.S << " bpr=" << bpr;
      EXPECT_TRUE(at::equal(kv, kv_ref)) << "masked, S=" << c.S << " bpr=" << bpr;
      EXPECT_FALSE(kv.logical_and(valid.logical_not().unsqueeze(2)).any().item<bool>());
      EXPECT_TRUE(pv.masked_select(valid.logical_not().unsqueeze(2).expand_as(pv)).eq(-1).all().item<bool>());
    }
}

TEST(Kernels, PermuteMatchesIndexSelect) {
  at::manual_seed(4);
  for (auto dt : {at::kFloat, at::kBFloat16})
    for (int64_t H : {1, 7, 64}) {
      at::Tensor x = at::randn({50, H}).to(dt);
      at::Tensor idx = at::randint(50, {123}, at::kLong);
      EXPECT_TRUE(at::equal(permute_rows(x, idx), x.index_select(0, idx)));
      at::Tensor s = at::rand({123});
      at::Tensor ref = (x.index_select(0, idx).to(at::kFloat) * s.unsqueeze(1)).to(dt);
      EXPECT_TRUE(at::equal(permute_rows(x, idx, s), ref)) << dt << " H=" << H;
    }
}

TEST(Kernels, CombineMatchesIndexAdd) {
  at::manual_seed(5);
  for (auto dt : {at::kFloat, at::kBFloat16})
    for (int64_t K : {1, 2, 4}) {
      const int64_t N = 40, H = 24;
      // Each token keeps a random subset of its K choices; rows in shuffled send order.
      at::Tensor kept = (at::rand({N * K}) < 0.8).nonzero().squeeze(1);
      at::Tensor choice = kept.index_select(0, at::randperm(kept.numel(), at::kLong));
      const int64_t A = choice.numel();
      at::Tensor y = at::randn({A, H}).to(dt), gate = at::rand({A});
      at::Tensor token = choice.floor_divide(K);
      at::Tensor row_of = inverse_rows(choice, N, K);
      at::Tensor weight = at::where(row_of >= 0, gate.index_select(0, row_of.clamp_min(0).view(-1)).view_as(row_of),
                                    at::zeros({}));
      at::Tensor got = combine_rows(y, row_of, weight);
      at::Tensor ref = at::zeros({N, H}, at::kDouble).index_add(0, token, y.to(at::kDouble) * gate.to(at::kDouble).unsqueeze(1));
      // float: sums of <= 4 products; bfloat16: one rounding of the float sum (2^-8 relative per element).
      const double tol = dt == at::kFloat ? 1e-6 : 8e-3;
      EXPECT_LT(max_rel(got, ref), tol) << dt << " K=" << K;
      if (dt == at::kFloat && K <= 2) {  // two terms: exactly torch's weighted index_add
        at::Tensor exact = at::zeros({N, H}).index_add(0, token, y * gate.unsqueeze(1));
        EXPECT_TRUE(at::equal(got, exact));
      }
      at::Tensor unweighted = combine_rows(y, row_of);
      EXPECT_LT(max_rel(unweighted, at::zeros({N, H}, at::kDouble).index_add(0, token, y.to(at::kDouble))), tol);
    }
}

TEST(Kernels, AutogradMatchesTorchOps) {
  at::manual_seed(6);
  const int64_t N = 30, K = 2, H = 16;
  at::Tensor kept = (at::rand({N * K}) < 0.85).nonzero().squeeze(1);
  at::Tensor choice = kept.index_select(0, at::randperm(kept.numel(), at::kLong));
  at::Tensor token = choice.floor_divide(K);
  at::Tensor row_of = inverse_rows(choice, N, K);
  at::Tensor x = at::randn({N, H}).requires_grad_(true);
  at::Tensor w = at::randn({H, H});
  at::Tensor gate = at::rand({choice.numel()}).requires_grad_(true);
  at::Tensor up = at::randn({N, H});
  auto run = [&](bool fused) {
    at::Tensor rows = fused ? permute_rows_autograd(x, token, row_of) : x.index_select(0, token);
    at::Tensor y = at::tanh(at::mm(rows, w));
    at::Tensor out = fused ? combine_autograd(y, gate, token, row_of)
                           : at::zeros({N, H}).index_add(0, token, y * gate.unsqueeze(1));
    auto g = torch::autograd::grad({(out * up).sum()}, {x, gate});
    return std::tuple{out.detach(), g[0], g[1]};
  };
  auto [o1, gx1, gg1] = run(true);
  auto [o0, gx0, gg0] = run(false);
  EXPECT_LT(max_rel(o1, o0), 1e-6);
  EXPECT_LT(max_rel(gx1, gx0), 1e-6);
  EXPECT_LT(max_rel(gg1, gg0), 1e-5);
}

ModelConfig layer_config(int E, int k, bool bpr) {
  ModelConfig m;
  m.hidden = 24;
  m.mlp_dim = 40;
  m.num_heads = 1;
  m.moe.num_experts = E;
  m.moe.top_k = k;
  m.moe.group_size = 4;
  m.moe.capacity_factor = 1.0;
  m.moe.bpr = bpr;
  return m;
}

// The whole MoE layer (routing, dispatch, experts, combine), kernels on and off.
TEST(Kernels, MoeLayerFusedEqualsTorchPath) {
  for (int k : {1, 2})
    for (bool bpr : {false, true}) {
      const ModelConfig mc = layer_config(8, k, bpr);
      SelfCommunicator comm;
      at::manual_seed(7);
      MoeLayer layer(mc, 1, Placement::contiguous(8, 1), comm, 11);
      at::Tensor x0 = at::randn({16, 9, 24});
      auto run = [&](DispatcherKind backend) {
        layer->set_runtime({backend, ExpertGemm::Loop});
        layer->zero_grad();
        at::Tensor x = x0.clone().requires_grad_(true);
        ForwardContext ctx;
        ctx.in.train = true;
        ctx.in.noise_seed = 5;
        ctx.in.total_groups = 4;
        std::map<int, LayerStats> stats;
        ctx.probes.stats = &stats;
        at::Tensor y = layer->forward(x, ctx);
        ((y * y).sum() + ctx.aux_loss).backward();
        std::vector<at::Tensor> grads{x.grad()};
        for (const auto& p : layer->parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
        return std::tuple{y.detach(), grads, stats[1].kept};
      };
      auto [y1, g1, kept1] = run(DispatcherKind::Kernels);
      auto [y0, g0, kept0] = run(DispatcherKind::Torch);
      EXPECT_EQ(kept1, kept0);
      EXPECT_LT(max_rel(y1, y0), 1e-6) << "k=" << k << " bpr=" << bpr;
      for (size_t i = 0; i < g0.size(); ++i) EXPECT_LT(max_rel(g1[i], g0[i]), 1e-5) << "gradient " << i;
    }
}

// Padding images (the last evaluation batch) must not change how real images are
// routed, even under BPR with tight capacity, and must not count in the statistics.
TEST(Kernels, PaddingImagesDoNotAffectRealImages) {
  ModelConfig mc = layer_config(8, 2, /*bpr=*/true);
  mc.moe.capacity_factor = 0.5;
  SelfCommunicator comm;
  at::manual_seed(12);
  MoeLayer layer(mc, 1, Placement::contiguous(8, 1), comm, 13);
  const int64_t B = 16, T = 5, real = 10;  // groups of 4 images: group 2 mixed, group 3 all padding
  at::Tensor x = at::randn({B, T, 24});
  at::Tensor valid = at::arange(B) < real;
  for (DispatcherKind backend : {DispatcherKind::Torch, DispatcherKind::Kernels}) {
    layer->set_runtime({backend, ExpertGemm::Loop});
    auto run = [&](double pad_scale, bool masked, int64_t* tokens = nullptr, int64_t* kept = nullptr) {
      at::Tensor xi = x.clone();
      xi.narrow(0, real, B - real).normal_(0, pad_scale);
      ForwardContext ctx;
      ctx.in.total_groups = B / mc.moe.group_size;
      if (masked) ctx.in.image_valid = valid;
      std::map<int, LayerStats> stats;
      ctx.probes.stats = &stats;
      at::Tensor y = layer->forward(xi, ctx).narrow(0, 0, real);
      if (tokens) *tokens = stats[1].tokens;
      if (kept) {
        *kept = 0;
        for (int64_t n : stats[1].kept) *kept += n;
      }
      return y;
    };
    int64_t tokens = 0, kept = 0;
    at::Tensor a = run(50.0, true, &tokens, &kept), b = run(0.01, true);
    EXPECT_TRUE(at::equal(a, b)) << "backend " << name_of(backend);
    EXPECT_EQ(tokens, real * T);
    EXPECT_LE(kept, real * T * 2);
    // Without the mask the padding competes for capacity: the test can tell.
    EXPECT_FALSE(at::equal(run(50.0, false), run(0.01, false)));
  }
}

// The experts as one grouped GEMM per side (at::_grouped_mm) and as one batched
// product over padded experts, against one GEMM pair per expert: same outputs and
// gradients, empty experts included.
TEST(Kernels, GroupedExpertGemmEqualsLoop) {
  at::manual_seed(14);
  ExpertBank bank(24, 40, std::vector<int>{0, 2, 3, 5, 6}, 1, 9);
  const std::vector<int64_t> counts{7, 0, 13, 1, 4};
  at::Tensor x0 = at::randn({25, 24}), up = at::randn({25, 24});
  auto run = [&](ExpertGemm g) {
    bank->set_gemm(g);
    bank->zero_grad();
    at::Tensor x = x0.clone().requires_grad_(true);
    at::Tensor y = bank->forward(x, counts);
    (y * up).sum().backward();
    std::vector<at::Tensor> out{y.detach(), x.grad()};
    for (const auto& p : bank->parameters()) out.push_back(p.grad().clone());
    return out;
  };
  const auto loop = run(ExpertGemm::Loop);
  for (ExpertGemm g : {ExpertGemm::Grouped, ExpertGemm::Batched}) {
    const auto other = run(g);
    for (size_t i = 0; i < loop.size(); ++i) EXPECT_LT(max_rel(other[i], loop[i]), 1e-5) << str(g) << " tensor " << i;
    // Under bf16 autocast both compute in bfloat16 (the loop's and batched's rows
    // padded for oneDNN): close, not equal (different GEMM kernels).
    AutocastGuard amp(at::Device(at::kCPU), Precision::Bf16);
    bank->set_gemm(g);
    at::Tensor a = bank->forward(x0.to(at::kBFloat16), counts);
    bank->set_gemm(ExpertGemm::Loop);
    at::Tensor b = bank->forward(x0.to(at::kBFloat16), counts);
    EXPECT_EQ(a.scalar_type(), at::kBFloat16);
    EXPECT_LT(max_rel(a, b), 3e-2) << str(g);
  }
  // bf16 training through the padded loop and the batched product: gradients close
  // to float32's (padding adds nothing).
  for (ExpertGemm g : {ExpertGemm::Loop, ExpertGemm::Batched}) {
    bank->set_gemm(g);
    bank->zero_grad();
    at::Tensor x = x0.clone().requires_grad_(true);
    {
      AutocastGuard amp(at::Device(at::kCPU), Precision::Bf16);
      (bank->forward(x, counts).to(at::kFloat) * up).sum().backward();
    }
    EXPECT_LT(max_rel(x.grad(), loop[1]), 3e-2) << str(g) << " input gradient";
    size_t i = 2;
    for (const auto& p : bank->parameters()) EXPECT_LT(max_rel(p.grad(), loop[i++]), 3e-2) << str(g) << " gradient";
  }
}

// The loop strategy's one autograd node (hand-written backward writing the stacked
// weight gradients in place) against the same per-expert ops recorded by autograd:
// outputs, input and weight gradients bit for bit, float32 and bf16 autocast (rows
// padded for oneDNN), experts without rows, 1 and 2 threads, backward under autocast
// as the trainer runs it (the scope closed first).
TEST(Kernels, LoopExpertsEqualAutogradOfTheSameOps) {
  const int threads = at::get_num_threads();
  at::manual_seed(15);
  ExpertBank bank(24, 40, std::vector<int>{0, 2, 3, 5, 6, 7}, 1, 9);
  {
    at::NoGradGuard g;
    bank->b1.normal_(), bank->b2.normal_();  // nonzero biases: their gradients and values count
  }
  bank->set_gemm(ExpertGemm::Loop);
  const std::vector<int64_t> counts{7, 0, 33, 1, 4, 0};
  at::Tensor x0 = at::randn({45, 24}), up = at::randn({45, 24});
  // The reference: autograd over per-expert ops (the loop before it had its own node).
  const auto reference = [&](const at::Tensor& x, bool bf16) {
    at::Tensor w1 = bank->w1, b1 = bank->b1, w2 = bank->w2, b2 = bank->b2;
    if (bf16) w1 = w1.to(at::kBFloat16), b1 = b1.to(at::kBFloat16), w2 = w2.to(at::kBFloat16), b2 = b2.to(at::kBFloat16);
    const auto W1 = w1.unbind(0), B1 = b1.unbind(0), W2 = w2.unbind(0), B2 = b2.unbind(0);
    const auto xs = x.split_with_sizes(counts, 0);
    std::vector<at::Tensor> outs;
    for (size_t i = 0; i < counts.size(); ++i) {
      if (counts[i] == 0) continue;
      int64_t rows = counts[i];
      if (bf16) {  // the loop's padding: one of 8 sizes per octave, 16 at least
        int64_t octave = 1;
        while (octave * 2 <= rows) octave *= 2;
        const int64_t step = std::max<int64_t>(16, octave / 8);
        rows = std::max<int64_t>(16, (rows + step - 1) / step * step);
      }
      const at::Tensor xi = rows == counts[i] ? xs[i] : at::constant_pad_nd(xs[i], {0, 0, 0, rows - counts[i]});
      at::Tensor y = at::addmm(B2[i], at::gelu(at::addmm(B1[i], xi, W1[i]), "tanh"), W2[i]);
      outs.push_back(rows == counts[i] ? y : y.narrow(0, 0, counts[i]));
    }
    return at::cat(outs, 0);
  };
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    for (bool bf16 : {false, true}) {
      const auto run = [&](bool ref) {
        bank->zero_grad();
        at::Tensor x = (bf16 ? x0.to(at::kBFloat16) : x0.clone()).requires_grad_(true);
        at::Tensor y;
        {
          AutocastGuard amp(at::Device(at::kCPU), bf16 ? Precision::Bf16 : Precision::Fp32);
          y = ref ? reference(x, bf16) : bank->forward(x, counts);
        }
        (y.to(at::kFloat) * up).sum().backward();
        std::vector<at::Tensor> out{y.detach(), x.grad()};
        for (const auto& p : bank->parameters()) out.push_back(p.grad().clone());
        return out;
      };
      const auto want = run(true), got = run(false);
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(got[i].scalar_type(), want[i].scalar_type()) << "tensor " << i;
        EXPECT_TRUE(at::equal(got[i], want[i])) << (bf16 ? "bf16" : "fp32") << ", " << t << " threads: tensor " << i
                                                << " (0 output, 1 input gradient, then w1 b1 w2 b2 gradients)";
      }
    }
  }
  at::set_num_threads(threads);
}

// The batched product pads every expert to the layer's rows bound, so an expert's
// outputs and gradients are the same bits whichever experts share its bank: one
// expert alone (a batch of one would split its weight gradient among threads), two,
// three, or all six, first or last in the bank. That is what lets `auto` pick it:
// re-placing survivors after pruning must be bit-identical (PruneMpi). On 2 threads,
// with row counts large enough that a GEMM or an elementwise op splits its work
// among threads, and the fullest expert filling the bound. mlp 38 puts the thread
// split of a 3-expert batch's GELU mid-vector (2000 x 38 / 32 is odd), where ATen's
// elementwise loop hands the chunk's last elements to the scalar tanh: one GELU over
// the whole batch instead of one per expert fails here (checked).
TEST(Kernels, BatchedExpertsDoNotDependOnTheirNeighbours) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  at::manual_seed(15);
  const std::vector<int> all{0, 1, 2, 3, 4, 5};
  const std::vector<int64_t> counts{900, 0, 1500, 37, 2000, 641};
  const int64_t bound = 2000;
  std::vector<at::Tensor> xs, ups;
  for (int64_t n : counts) xs.push_back(at::randn({n, 16}) * 3), ups.push_back(at::randn({n, 16}));
  // Outputs, input gradient and parameter gradients of each expert of `ids`.
  auto run = [&](const std::vector<int>& ids, int64_t rows_bound, bool bf16) {
    ExpertBank bank(16, 38, ids, 1, 9, ExpertGemm::Batched);
    std::vector<at::Tensor> x_parts, up_parts;
    std::vector<int64_t> cs;
    for (int id : ids) x_parts.push_back(xs[id]), up_parts.push_back(ups[id]), cs.push_back(counts[id]);
    at::Tensor x = at::cat(x_parts).requires_grad_(true);
    at::Tensor y;
    {
      std::optional<AutocastGuard> amp;
      if (bf16) amp.emplace(at::Device(at::kCPU), Precision::Bf16);
      y = bank->forward(x, cs, rows_bound).to(at::kFloat);
      (y * at::cat(up_parts)).sum().backward();
    }
    std::map<int, std::vector<at::Tensor>> out;
    int64_t row = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      auto& o = out[ids[i]];
      o.push_back(y.detach().narrow(0, row, cs[i]));
      o.push_back(x.grad().narrow(0, row, cs[i]));
      for (const auto& p : bank->parameters()) o.push_back(p.grad()[static_cast<int64_t>(i)].clone());
      row += cs[i];
    }
    return out;
  };
  // Without the bound a bank pads to its own largest count: float32 weight gradients
  // then change (the products' row sums are blocked by the padded count; outputs do
  // not change), so the bound is what keeps training placement-invariant.
  EXPECT_FALSE(at::equal(run({2}, 0, false).at(2)[2], run(all, bound, false).at(2)[2]));
  for (bool bf16 : {false, true}) {
    const auto ref = run(all, bound, bf16);
    for (const std::vector<int>& ids : {std::vector<int>{4}, std::vector<int>{2}, std::vector<int>{2, 4},
                                        std::vector<int>{4, 5}, std::vector<int>{1, 2, 5}}) {
      const auto got = run(ids, bound, bf16);
      for (int id : ids)
        for (size_t t = 0; t < ref.at(id).size(); ++t)
          EXPECT_TRUE(at::equal(got.at(id)[t], ref.at(id)[t]))
              << (bf16 ? "bf16" : "fp32") << " expert " << id << " tensor " << t << " with " << ids.size()
              << " experts in the bank";
    }
  }
  at::set_num_threads(threads);
}

// ---- GPU: the CUDA kernels against the host path.
const char* gpu_skip_reason() {
  if (!cuda_kernels_built()) return "built without the CUDA path: CUDA kernel test skipped";
  if (!at::hasCUDA()) return "no CUDA device visible: CUDA kernel test skipped";
  if (!cuda_kernels_runnable(0))
    return "the kernels were built for another GPU architecture (CMAKE_CUDA_ARCHITECTURES): CUDA kernel test skipped";
  return nullptr;
}
#define REQUIRE_GPU()                                   \
  do {                                                  \
    if (const char* why = gpu_skip_reason()) {          \
      GTEST_SKIP() << why;                              \
    }                                                   \
  } while (0)

TEST(Gpu, TopkAndSlotsMatchHost) {
  REQUIRE_GPU();
  at::manual_seed(8);
  for (int E : {8, 32})
    for (int k : {1, 2}) {
      at::Tensor probs = at::softmax(at::randn({4, 1000, E}), -1);
      auto [ex, g] = fused_topk(probs, k);
      auto [exg, gg] = fused_topk(probs.cuda(), k);
      EXPECT_TRUE(at::equal(ex, exg.cpu()));
      EXPECT_TRUE(at::equal(g, gg.cpu()));
      at::Tensor order = priority_order(g, /*bpr=*/true);
      const int64_t cap = expert_capacity(1000, k, 1.0, E);
      auto [pos, keep] = fused_assign_slots(ex, order, E, cap);
      auto [posg, keepg] = fused_assign_slots(ex.cuda(), order.cuda(), E, cap);
      EXPECT_TRUE(at::equal(pos, posg.cpu()));
      EXPECT_TRUE(at::equal(keep, keepg.cpu()));
    }
}

TEST(Gpu, PermuteAndCombineMatchHost) {
  REQUIRE_GPU();
  at::manual_seed(9);
  for (auto dt : {at::kFloat, at::kBFloat16})
    for (int64_t H : {7, 768}) {  // scalar and 16-byte vector paths
      const int64_t N = 500, K = 2;
      at::Tensor choice = (at::rand({N * K}) < 0.9).nonzero().squeeze(1);
      choice = choice.index_select(0, at::randperm(choice.numel(), at::kLong));
      const int64_t A = choice.numel();
      at::Tensor x = at::randn({N, H}).to(dt), y = at::randn({A, H}).to(dt), s = at::rand({A});
      at::Tensor token = choice.floor_divide(K), row_of = inverse_rows(choice, N, K);
      at::Tensor w = at::rand({N, K});
      EXPECT_TRUE(at::equal(permute_rows(x, token, s), permute_rows(x.cuda(), token.cuda(), s.cuda()).cpu()));
      EXPECT_TRUE(at::equal(permute_rows(x, token), permute_rows(x.cuda(), token.cuda()).cpu()));
      // The device may contract w*v+acc into one FMA: one rounding apart at most.
      at::Tensor c = combine_rows(y, row_of, w), cg = combine_rows(y.cuda(), row_of.cuda(), w.cuda()).cpu();
      EXPECT_LT(max_rel(cg, c), dt == at::kFloat ? 1e-6 : 8e-3) << dt << " H=" << H;
    }
}

TEST(Gpu, GroupedExpertGemmBf16MatchesLoop) {
  REQUIRE_GPU();
  at::manual_seed(15);
  ExpertBank bank(64, 128, std::vector<int>{0, 1, 2, 3}, 1, 9);
  bank->to(at::kCUDA);
  const std::vector<int64_t> counts{33, 0, 100, 7};
  at::Tensor x = at::randn({140, 64}).cuda();
  AutocastGuard amp(x.device(), Precision::Bf16);
  bank->set_gemm(ExpertGemm::Grouped);
  at::Tensor a = bank->forward(x.to(at::kBFloat16), counts).cpu();
  bank->set_gemm(ExpertGemm::Loop);
  at::Tensor b = bank->forward(x.to(at::kBFloat16), counts).cpu();
  EXPECT_LT(max_rel(a, b), 3e-2);
}

TEST(Gpu, MoeLayerOnGpuMatchesCpu) {
  REQUIRE_GPU();
  const ModelConfig mc = layer_config(8, 2, true);
  SelfCommunicator comm;
  at::manual_seed(10);
  MoeLayer layer(mc, 1, Placement::contiguous(8, 1), comm, 11);
  at::Tensor x0 = at::randn({16, 9, 24});
  ForwardContext ctx;
  ctx.in.total_groups = 4;
  at::Tensor y_cpu = layer->forward(x0, ctx);
  layer->to(at::kCUDA);
  ForwardContext ctx2;
  ctx2.in.total_groups = 4;
  at::Tensor y_gpu = layer->forward(x0.cuda(), ctx2).cpu();
  EXPECT_LT(max_rel(y_gpu, y_cpu.detach()), 1e-4);  // TF32 is off by default in LibTorch; GEMM order differs
}

// The whole model (fused attention, grouped expert GEMMs, kernels dispatcher on the
// GPU; explicit attention, loop GEMMs, torch dispatcher on the CPU): same logits and
// gradients in float32, to rounding: 1e-4 of the largest logit; 1e-3 of the largest
// gradient of each parameter (sums over tokens in another order). TF32 is off for
// matrix products in LibTorch and turned off here for cuDNN's patch convolution.
TEST(Gpu, ModelForwardBackwardOnGpuMatchesCpu) {
  REQUIRE_GPU();
  struct Tf32Off {
    bool was = at::globalContext().allowTF32CuDNN();
    Tf32Off() { at::globalContext().setAllowTF32CuDNN(false); }
    ~Tf32Off() { at::globalContext().setAllowTF32CuDNN(was); }
  } tf32_off;
  ModelConfig cfg = layer_config(8, 2, true);
  cfg.image_size = 16;
  cfg.channels = 3;
  cfg.patch_size = 4;
  cfg.num_layers = 4;
  cfg.num_heads = 2;
  cfg.num_classes = 5;
  cfg.moe.every = 2;
  cfg.moe.group_size = 2;
  SelfCommunicator comm;
  VisionTransformer cpu = build_model(cfg, default_placements(cfg, 1), comm, c10::Device(c10::kCPU), 3);
  VisionTransformer gpu = build_model(cfg, default_placements(cfg, 1), comm, c10::Device(c10::kCUDA, 0), 3);
  at::manual_seed(4);
  at::Tensor images = at::randn({8, 3, 16, 16});
  auto run = [&](VisionTransformer& m, const at::Tensor& x) {
    ForwardContext ctx;
    ctx.in.train = true;
    ctx.in.noise_seed = 7;
    ctx.in.total_groups = 4;
    at::Tensor logits = m->forward(x, ctx);
    (logits.pow(2).sum() + ctx.aux_loss).backward();
    return logits.detach().cpu();
  };
  at::Tensor lc = run(cpu, images), lg = run(gpu, images.cuda());
  EXPECT_LT(max_rel(lg, lc), 1e-4);
  const auto pc = cpu->named_parameters(), pg = gpu->named_parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i) {
    ASSERT_TRUE(pc[i].value().grad().defined()) << pc[i].key();
    EXPECT_LT(max_rel(pg[i].value().grad().cpu(), pc[i].value().grad()), 1e-3) << pc[i].key();
  }
}

}  // namespace
}  // namespace moeprune
