// vmoe checkpoints <-> moeprune models: the parameter mapping (one table, both
// directions), the architecture a checkpoint determines, the check of a checkpoint
// against a model config, loading on any number of ranks (each rank reads the
// replicated parameters and only its own experts' rows), and gathering a model's
// parameters under vmoe's names for export.
//
// Mapping (vmoe path -> moeprune parameter):
//   embedding/kernel (P,P,C,H) HWIO        -> patch_embed.weight (H,C,P,P) OIHW
//   cls (1,1,H)                            -> cls_token
//   Encoder/posembed_input/pos_embedding   -> pos_embed (zoomed to the model's grid as vmoe's vit_zoom:
//                                             class-token row kept, bilinear with corners aligned)
//   .../SelfAttention/{query,key,value}/kernel (H,n,d), bias (n,d) -> rows of qkv.weight (3H,H), qkv.bias
//   .../SelfAttention/out/kernel (n,d,H)   -> proj.weight (H,H) (transposed), out/bias -> proj.bias
//   .../LayerNorm_0, LayerNorm_1           -> ln1, ln2 (scale -> weight)
//   .../Mlp/Dense_{0,1} (in,out)           -> fc1, fc2 (transposed)
//   .../Moe/Router/dense/kernel (H,E)      -> moe.routers.0.weight (H,E); E3: (H,M,E/M) or (H,E) -> routers.m
//   .../Moe/Mlp/Dense_{0,1}/kernel (E,in,out), bias (E,out) -> moe.experts.{w1,b1,w2,b2} (this rank's rows)
//   Encoder/encoder_norm                   -> norm
//   pre_logits/{kernel,bias}               -> pre_logits (model.representation_size)
//   head/{kernel,bias}                     -> head (or a new head: zero kernel, bias model.head_bias_init)
#pragma once
#include <map>
#include <string>

#include "ckpt/vmoe_format.h"
#include "core/config.h"
#include "dist/communicator.h"
#include "model/vit.h"

namespace moeprune {

// The architecture the checkpoint determines (hidden size, blocks, heads, MLP size,
// patch size, channels, image size from the position embeddings, classes,
// representation size, experts per layer, which blocks are MoE, E3 ensemble size),
// over `base`, whose routing settings (top-k, capacity factor, group size, noise)
// are kept. UserError when the checkpoint is not a V-MoE/E3 parameter tree or its
// MoE blocks follow neither vmoe's "every N" nor "last N" pattern.
ModelConfig vmoe_model_config(const VmoeCheckpoint& ck, const ModelConfig& base);

// Checks that the checkpoint holds exactly the leaves a model of `cfg` needs, with
// their shapes. With new_head (fine-tuning) the head may have any number of classes,
// the position embeddings may be of another grid (they are zoomed), and the
// checkpoint's pre_logits are left unused when model.representation_size is 0 (as
// vmoe's fine-tuning configs with representation_size None do). UserError naming
// the leaf, the shape found and the shape expected.
void check_vmoe_leaves(const VmoeCheckpoint& ck, const ModelConfig& cfg, bool new_head);

struct VmoeLoadReport {
  int64_t leaves = 0;    // leaves read
  int64_t elements = 0;  // elements read by this rank
  bool zoomed = false;   // position embeddings resized
};

// Fills model (built from a config that passed check_vmoe_leaves) from the
// checkpoint. This rank reads the replicated leaves and its own experts' rows only.
// new_head: the head is re-initialised (vmoe's fine-tuning drops it).
VmoeLoadReport load_vmoe(const VmoeCheckpoint& ck, VisionTransformer& model, bool new_head);

// Collective over `host`. The model's parameters under vmoe paths, whole, on rank 0
// (empty elsewhere): the experts of every layer gathered in expert-id order. A
// pruned layer (prune.routing: zero) keeps all E router columns; its pruned experts'
// tensors are written as zeros, the representation of the pruning paper's code.
// Models pruned with routing `drop` have no column for a pruned expert and cannot
// be written as a vmoe tree: UserError.
std::map<std::string, at::Tensor> vmoe_params(const VisionTransformer& model, Communicator& host);

}  // namespace moeprune
