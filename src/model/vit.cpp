#include "model/vit.h"

#include <torch/nn/init.h>

#include "core/error.h"
#include "model/trace_range.h"

#include <algorithm>
#include <cmath>

namespace moeprune {
namespace {

torch::nn::Linear make_linear(int in, int out) {
  torch::nn::Linear l(torch::nn::LinearOptions(in, out));
  torch::nn::init::xavier_uniform_(l->weight);
  torch::nn::init::zeros_(l->bias);
  return l;
}

torch::nn::LayerNorm make_ln(int dim) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-6));
}

}  // namespace

BlockImpl::BlockImpl(const ModelConfig& cfg, MoeLayer moe_layer) : heads_(cfg.num_heads) {
  ln1 = register_module("ln1", make_ln(cfg.hidden));
  qkv = register_module("qkv", make_linear(cfg.hidden, 3 * cfg.hidden));
  proj = register_module("proj", make_linear(cfg.hidden, cfg.hidden));
  ln2 = register_module("ln2", make_ln(cfg.hidden));
  if (moe_layer) {
    moe = register_module("moe", moe_layer);
  } else {
    fc1 = register_module("fc1", make_linear(cfg.hidden, cfg.mlp_dim));
    fc2 = register_module("fc2", make_linear(cfg.mlp_dim, cfg.hidden));
  }
}

at::Tensor BlockImpl::forward(const at::Tensor& x, ForwardContext& ctx) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = H / heads_;
  TraceRange range("vit::attention");
  at::Tensor qkv_out = qkv->forward(ln1->forward(x)).reshape({B, T, 3, heads_, D}).permute({2, 0, 3, 1, 4});
  at::Tensor q = qkv_out[0], k = qkv_out[1], v = qkv_out[2];  // [B, heads, T, D]
  at::Tensor a;
  if (x.is_cuda()) {
    // GPUs: one fused attention kernel (flash / memory-efficient), same scale 1/sqrt(D).
    a = at::scaled_dot_product_attention(q, k, v);
  } else {
    // CPUs: the explicit form (what every CPU result so far was computed with).
    a = at::matmul(at::softmax(at::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(D)), -1), v);
  }
  a = a.transpose(1, 2).reshape({B, T, H});
  at::Tensor h = x + proj->forward(a);
  range.next(is_moe() ? "vit::moe_layer" : "vit::mlp");  // the MoE layer's parts have ranges of their own
  at::Tensor y = ln2->forward(h);
  y = is_moe() ? moe->forward(y, ctx) : fc2->forward(at::gelu(fc1->forward(y), "tanh"));
  return h + y;
}

VisionTransformerImpl::VisionTransformerImpl(const ModelConfig& cfg, const std::vector<Placement>& placements,
                                             Communicator& comm, uint64_t seed, MoeRuntime runtime)
    : cfg_(cfg), runtime_(runtime) {
  patch_embed = register_module(
      "patch_embed",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(cfg.channels, cfg.hidden, cfg.patch_size).stride(cfg.patch_size)));
  cls_token = register_parameter("cls_token", at::zeros({1, 1, cfg.hidden}));
  pos_embed = register_parameter("pos_embed", at::randn({1, cfg.tokens_per_image(), cfg.hidden}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  const std::vector<int> moe_blocks = cfg.moe_blocks();
  TORCH_CHECK(placements.size() == moe_blocks.size(), "model: ", placements.size(), " placements for ",
              moe_blocks.size(), " MoE blocks");
  size_t next = 0;
  for (int b = 0; b < cfg.num_layers; ++b) {
    MoeLayer moe{nullptr};
    if (next < moe_blocks.size() && moe_blocks[next] == b) {
      moe = MoeLayer(cfg, b, placements[next], comm, seed, runtime);
      ++next;
    }
    blocks->push_back(Block(cfg, moe));
  }
  norm = register_module("norm", make_ln(cfg.hidden));
  int head_in = cfg.hidden;
  if (cfg.representation_size > 0) {
    pre_logits = register_module("pre_logits", make_linear(cfg.hidden, cfg.representation_size));
    head_in = cfg.representation_size;
  }
  head = register_module("head", torch::nn::Linear(head_in, cfg.num_classes));
  torch::nn::init::normal_(head->weight, 0.0, 0.02);
  torch::nn::init::zeros_(head->bias);
}

at::Tensor VisionTransformerImpl::embed_patches(const at::Tensor& images) const {
  // The convolution with stride = kernel = patch, computed as one GEMM over the
  // flattened patches: the same sums (in another order), far cheaper on CPUs
  // (V-MoE S/32, 16 images, 2 threads: forward + backward 47 -> 26 ms in float32,
  // 186 -> 17 ms in bf16, where oneDNN's strided convolution backward is slow).
  // The weights keep the convolution's layout [H, C, p, p] (checkpoints, importer).
  const int64_t B = images.size(0), C = images.size(1), p = cfg_.patch_size;
  const at::Tensor patches = images.unfold(2, p, p).unfold(3, p, p);  // [B, C, nh, nw, p, p]
  const int64_t nh = patches.size(2), nw = patches.size(3);
  const at::Tensor rows = patches.permute({0, 2, 3, 1, 4, 5}).reshape({B * nh * nw, C * p * p});
  const at::Tensor& w = patch_embed->weight;
  return at::linear(rows, w.reshape({w.size(0), -1}), patch_embed->bias).reshape({B, nh * nw, w.size(0)});
}

at::Tensor VisionTransformerImpl::forward(const at::Tensor& images, ForwardContext& ctx) {
  const int64_t B = images.size(0);
  TraceRange range("vit::embed");
  at::Tensor x = embed_patches(images);  // [B, P, H]
  x = at::cat({cls_token.expand({B, 1, cfg_.hidden}), x}, 1) + pos_embed;
  range.end();
  const int M = cfg_.moe.ensemble_size;
  bool repeated = M == 1;
  for (const auto& blk : *blocks) {
    auto* block = blk->as<BlockImpl>();
    if (!repeated && block->is_moe()) {
      x = x.repeat({M, 1, 1});  // member-major copies: [M*B, T, H]
      repeated = true;
    }
    x = block->forward(x, ctx);
  }
  range.next("vit::head");
  at::Tensor cls = norm->forward(x.select(1, 0));  // [M*B, H]
  if (!pre_logits.is_empty()) cls = at::tanh(pre_logits->forward(cls));
  return head->forward(cls).reshape({M, B, cfg_.num_classes});
}

void VisionTransformerImpl::set_runtime(const MoeRuntime& rt) {
  runtime_ = rt;
  for (auto& l : moe_layers()) l->set_runtime(rt);
}

std::vector<MoeLayer> VisionTransformerImpl::moe_layers() const {
  std::vector<MoeLayer> out;
  for (const auto& blk : *blocks) {
    auto* block = blk->as<BlockImpl>();
    if (block->is_moe()) out.push_back(block->moe);
  }
  return out;
}

std::vector<at::Tensor> VisionTransformerImpl::dense_parameters() const {
  std::vector<at::Tensor> out;
  for (const auto& item : named_parameters())
    if (!is_expert_param(item.key())) out.push_back(item.value());
  return out;
}

std::vector<at::Tensor> VisionTransformerImpl::expert_parameters() const {
  std::vector<at::Tensor> out;
  for (const auto& item : named_parameters())
    if (is_expert_param(item.key())) out.push_back(item.value());
  return out;
}

std::vector<Placement> default_placements(const ModelConfig& cfg, int world_size) {
  std::vector<Placement> out;
  for (int block : cfg.moe_blocks()) {
    const int n = static_cast<int>(cfg.layer_experts(block).size());
    out.push_back(Placement::contiguous(n, world_size, /*allow_empty=*/n < cfg.moe.num_experts));
  }
  return out;
}

VisionTransformer build_model(const ModelConfig& cfg, const std::vector<Placement>& placements, Communicator& comm,
                              c10::Device device, uint64_t seed, MoeRuntime runtime) {
  at::manual_seed(seed);
  VisionTransformer model(cfg, placements, comm, seed, runtime);
  model->to(device);
  return model;
}

void copy_parameters(const VisionTransformer& src, VisionTransformer& dst, bool new_head) {
  at::NoGradGuard ng;
  const auto from = src->named_parameters();
  for (const auto& l : dst->moe_layers())
    TORCH_CHECK(local_expert_ids(src, l->layer()) == l->experts->expert_ids(), "copy_parameters: block ", l->layer(),
                " holds other experts in the source model");
  for (auto& item : dst->named_parameters()) {
    at::Tensor p = item.value();
    if (item.key().rfind("head.", 0) == 0 && new_head) continue;
    const at::Tensor* s = from.find(item.key());
    TORCH_CHECK(s && s->sizes() == p.sizes(), "copy_parameters: '", item.key(), "' differs in the source model");
    p.copy_(*s);
  }
  if (new_head) reset_head(dst);
}

void reset_head(VisionTransformer& model) {
  at::NoGradGuard ng;
  model->head->weight.zero_();
  model->head->bias.fill_(model->config().head_bias_init);
}

bool is_expert_param(const std::string& name) { return name.find(".experts.") != std::string::npos; }

int block_of_param(const std::string& name) {
  const auto a = name.find('.') + 1, b = name.find('.', a);
  return std::stoi(name.substr(a, b - a));
}

MoeLayer moe_layer_of(const VisionTransformer& model, int block) {
  for (const auto& l : model->moe_layers())
    if (l->layer() == block) return l;
  throw std::logic_error(concat("model: block ", block, " is not an MoE block"));
}

const std::vector<int>& local_expert_ids(const VisionTransformer& model, int block) {
  return moe_layer_of(model, block)->experts->expert_ids();
}

double expert_flops_per_token(const ModelConfig& cfg, const RoutingStats& load) {
  double kept = 0, tokens = 0;
  for (const auto& [block, s] : load) {
    for (int64_t k : s.kept) kept += static_cast<double>(k);
    tokens += static_cast<double>(s.tokens);
  }
  return tokens > 0 ? 4.0 * cfg.hidden * cfg.mlp_dim * kept / tokens : 0.0;
}

double forward_flops_per_image(const ModelConfig& cfg) {
  const double T = cfg.tokens_per_image(), H = cfg.hidden, F = cfg.mlp_dim, P = T - 1;
  const double p = cfg.patch_size;
  double flops = 2 * P * cfg.channels * p * p * H;
  const auto moe = cfg.moe_blocks();
  const double M = cfg.moe.ensemble_size;
  for (int b = 0; b < cfg.num_layers; ++b) {
    const bool is_moe = std::find(moe.begin(), moe.end(), b) != moe.end();
    const double copies = (!moe.empty() && b >= moe.front()) ? M : 1;
    double blk = 2 * T * H * 3 * H + 2 * T * H * H + 4 * T * T * H;
    blk += (is_moe ? cfg.moe.top_k : 1) * 4 * T * H * F;
    flops += copies * blk;
  }
  const double R = cfg.representation_size;
  if (R > 0) flops += 2 * M * H * R;
  return flops + 2 * M * (R > 0 ? R : H) * cfg.num_classes;
}

at::Tensor ensemble_log_probs(const at::Tensor& logits) {
  const double M = static_cast<double>(logits.size(0));
  return at::logsumexp(at::log_softmax(logits, -1), 0) - std::log(M);
}

at::Tensor cross_entropy_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t M = logits.size(0);
  at::Tensor lp = at::log_softmax(logits, -1);  // [M, B, C]
  at::Tensor picked = lp.gather(2, labels.view({1, -1, 1}).expand({M, labels.size(0), 1})).squeeze(2);
  return -picked.sum() / static_cast<double>(M);
}

}  // namespace moeprune
