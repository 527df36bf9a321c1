// The V-MoE vision transformer (google-research/vmoe): patch embedding, class
// token, learned position embeddings, pre-LayerNorm blocks of multi-head
// self-attention and MLP (GELU), token classifier head. The MLP of the blocks
// listed by ModelConfig::moe_blocks() is an MoE layer. E3-MoE: the tokens are
// repeated M times before the first MoE block and each copy runs to its own
// prediction.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <vector>

#include "core/config.h"
#include "dist/communicator.h"
#include "model/moe_layer.h"
#include "model/placement.h"

namespace moeprune {

class BlockImpl : public torch::nn::Module {
 public:
  // moe is null for a dense block.
  BlockImpl(const ModelConfig& cfg, MoeLayer moe);
  // x: [B, T, hidden] -> [B, T, hidden]
  at::Tensor forward(const at::Tensor& x, ForwardContext& ctx);
  bool is_moe() const { return !moe.is_empty(); }

  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
  MoeLayer moe{nullptr};

 private:
  int heads_;
};
TORCH_MODULE(Block);

class VisionTransformerImpl : public torch::nn::Module {
 public:
  // placements: one per MoE block (in moe_blocks() order). Dense parameters come
  // from torch's global generator (seed it identically on every rank first, or use
  // build_model); experts from their own seeds, so every rank builds the same model.
  VisionTransformerImpl(const ModelConfig& cfg, const std::vector<Placement>& placements, Communicator& comm,
                        uint64_t seed, MoeRuntime runtime = {});
  // images: [B, C, H, W] float -> logits [M, B, num_classes] (M = 1 for V-MoE).
  at::Tensor forward(const at::Tensor& images, ForwardContext& ctx);

  const ModelConfig& config() const { return cfg_; }
  const MoeRuntime& runtime() const { return runtime_; }
  // Another dispatcher backend or expert GEMM strategy in every MoE layer.
  void set_runtime(const MoeRuntime& rt);
  std::vector<MoeLayer> moe_layers() const;
  // Parameters replicated on every rank (everything but the experts).
  std::vector<at::Tensor> dense_parameters() const;
  // Parameters of the experts this rank holds.
  std::vector<at::Tensor> expert_parameters() const;

  torch::nn::Conv2d patch_embed{nullptr};  // its weights; applied as one GEMM over patches (embed_patches)
  at::Tensor cls_token, pos_embed;
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear pre_logits{nullptr};  // model.representation_size > 0: hidden -> R, then tanh
  torch::nn::Linear head{nullptr};

 private:
  // images [B, C, H, W] -> [B, patches, hidden]: patch_embed's convolution.
  at::Tensor embed_patches(const at::Tensor& images) const;

  ModelConfig cfg_;
  MoeRuntime runtime_;
};
TORCH_MODULE(VisionTransformer);

// Default placements: contiguous blocks of experts per rank in every MoE layer.
std::vector<Placement> default_placements(const ModelConfig& cfg, int world_size);

// The one way a job builds its model: torch's generator seeded with `seed` on every
// rank for the dense weights (experts have their own seeds), the given placements,
// moved to `device`.
VisionTransformer build_model(const ModelConfig& cfg, const std::vector<Placement>& placements, Communicator& comm,
                              c10::Device device, uint64_t seed, MoeRuntime runtime = {});

// Copies every parameter of src into dst, built from the same config and
// placements; new_head: dst's classifier head (which may have another size) is
// re-initialised instead (fine-tuning on a new task, as load_model with new_head).
void copy_parameters(const VisionTransformer& src, VisionTransformer& dst, bool new_head);
// A new head for a new task, as vmoe's fine-tuning makes it: zero kernel, bias
// model.head_bias_init.
void reset_head(VisionTransformer& model);

// Parameter names: "blocks.<b>.moe.experts.<w>" are expert parameters (held by one
// rank); everything else is replicated.
bool is_expert_param(const std::string& name);
// "blocks.3.moe.experts.w1" -> 3.
int block_of_param(const std::string& name);
// The original ids of the experts this rank holds in MoE block `block` (the order of
// the rows of its expert parameters).
const std::vector<int>& local_expert_ids(const VisionTransformer& model, int block);
// The MoE layer of block `block`.
MoeLayer moe_layer_of(const VisionTransformer& model, int block);

// Measured expert FLOPs per token per MoE layer: 4*H*F per kept choice, from the
// routing statistics of an evaluation (LayerStats::kept / tokens).
double expert_flops_per_token(const ModelConfig& cfg, const RoutingStats& load);

// Forward FLOPs of one image (multiply-add = 2), with the MoE layers counted as k
// expert MLPs per token (their dense-equivalent cost); E3 members multiply the
// blocks from the first MoE block on.
double forward_flops_per_image(const ModelConfig& cfg);

// logits [M, B, C] -> log of the mean of the members' probabilities, [B, C].
at::Tensor ensemble_log_probs(const at::Tensor& logits);
// Sum over images of the per-member cross-entropy averaged over members.
// logits [M, B, C], labels [B] int64 -> scalar.
at::Tensor cross_entropy_sum(const at::Tensor& logits, const at::Tensor& labels);

}  // namespace moeprune
