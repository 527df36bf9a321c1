// Typed job configuration filled from YAML (configs/*.yaml or the embedded
// default), with "--set a.b=c" overrides and `base:` inheritance between files.
// Unknown keys and invalid values are UserErrors naming the key and what was
// expected. Choices are enums from the moment the config is read (core/choices.h).
// Reading lives in config_read.cpp, validation in config_validate.cpp:
// parse_config() returns only configs that passed validate().
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/choices.h"

namespace moeprune {

struct MoeConfig {
  int num_experts = 8;            // E per MoE layer (all members together for E3)
  int top_k = 2;                  // k experts per token
  int every = 2;                  // MoE in blocks every-1, 2*every-1, ... (0 = off)
  int last = 0;                   // or: MoE in the last `last` odd blocks (0 = off)
  double capacity_factor = 1.05;  // capacity = ceil(S*k*cf/E) rounded up to a multiple of 4
  double noise_std = 1.0;         // router noise std is noise_std / E, training only
  // Std of the router kernel's initial values; 0 = vmoe's (flax's default
  // lecun_normal for the router Dense: 1/sqrt(hidden)).
  double router_init_std = 0.0;
  bool bpr = false;               // Batch Prioritized Routing
  int group_size = 8;             // images per routing group
  double importance_loss_weight = 0.005;
  double load_loss_weight = 0.005;
  int ensemble_size = 1;          // E3-MoE members M (1 = plain V-MoE)
};

struct ModelConfig {
  std::string name = "vmoe";
  int image_size = 28;
  int channels = 1;
  int patch_size = 4;
  int hidden = 64;
  int mlp_dim = 128;
  int num_layers = 6;
  int num_heads = 4;
  int num_classes = 10;
  // vmoe's `representation_size`: a pre_logits layer (hidden -> this, then tanh)
  // between the class token and the head; 0 = none (the head reads the token).
  int representation_size = 0;
  // vmoe's `head_bias_init`: the bias of a re-initialised head (its kernel is zero).
  double head_bias_init = 0.0;
  MoeConfig moe;
  // After pruning (set from a checkpoint, not from YAML): the surviving original
  // expert ids of each MoE block (a block absent here keeps all experts), and how
  // routers treat pruned experts: drop (their router columns are removed, softmax
  // over the survivors) or zero (softmax over all original experts; choices of a
  // pruned expert contribute zero and cost nothing).
  std::map<int, std::vector<int>> kept_experts;
  PrunedRouting pruned_routing = PrunedRouting::Drop;

  int tokens_per_image() const;   // patches + class token
  std::vector<int> layer_experts(int block) const;  // surviving ids of a block (all when unpruned)
  std::vector<int> moe_blocks() const;  // indices of the MoE blocks, ascending
};

struct AugmentConfig {
  int crop_padding = 0;           // random crop after zero padding by this many pixels (0 = off)
  bool flip = false;              // random horizontal flip
  // Inception-style random resized crop (vmoe's inception_crop: a box of 5-100% of the
  // area with aspect ratio in [3/4, 4/3], resized to the model's resolution), instead
  // of crop_padding. Evaluation resizes the whole image.
  bool inception_crop = false;
  std::vector<double> mean{0.5};  // per channel, on [0, 1] pixels (one value = all channels)
  std::vector<double> std{0.5};
};

struct DataConfig {
  DatasetKind dataset = DatasetKind::FashionMnist;
  std::string root = "/usr/share/datasets/fashion-mnist";
  Cifar100Labels cifar100_labels = Cifar100Labels::Fine;
  double val_fraction = 0.02;     // V-MoE split: train[:98%] / train[98%:]
  int eval_batch_size = 256;      // global; padded at the end of a split
  int prefetch = 2;               // batches prepared ahead by a background thread (0 = none)
  AugmentConfig augment;
  // planted: the pruning paper's synthetic binary task
  int planted_train = 4096;
  int planted_test = 1024;
  int planted_patches = 2;        // patches that carry the label feature
  double planted_noise = 0.5;     // std of the noise in every patch
  int planted_tasks = 1;          // binary tasks with their own label features: classes 2t, 2t+1
  // > 0: each task is a lookup of K prototypes (random directions in a subspace of
  // the task's own, each with a random label bit) instead of the signed label feature.
  int planted_prototypes = 0;
  int64_t planted_seed = -1;      // seed of the generated images (-1 = the job seed)
  // Pixel codes (core/pixel_code.h): K codes turn the data set into K domains of its
  // C classes; class d * C + c is class c seen through code d (empty = the data set as is).
  std::vector<std::string> domains;
};

// One training phase (pretrain, finetune or refinetune): its task and its optimisation.
struct PhaseConfig {
  bool enabled = true;
  std::vector<int> classes;       // dataset classes used (empty = all), in label order
  std::vector<int> label_map;     // optional: label_map[i] = label of classes[i] (regrouping)
  std::string init;               // finetune: model file to start from ("" = the pretrain output)
  OptimizerKind optimizer = OptimizerKind::Sgd;  // sgd (momentum) | adamw
  // bf16 runs the forward pass under autocast (GEMMs and the expert payload in
  // bfloat16); router, losses, master weights and optimiser stay float32.
  Precision precision = Precision::Fp32;
  double lr = 0.01;
  double end_lr = 1e-5;
  int warmup_steps = 0;
  int steps = 100;
  double momentum = 0.9;          // sgd
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // adamw
  double weight_decay = 0.0;
  double clip_norm = 1.0;         // global gradient norm clip (0 = off)
  int batch_size = 64;            // global images per optimiser step
  int accumulation = 1;           // micro-batches per step
  int eval_every = 0;             // validation every n steps (0 = only at the end)
  int log_every = 20;             // metrics line every n steps
  int history_every = 50;         // router history record every n steps (finetune)
  double router_entropy_weight = 0.0;  // SEER-MoE stage 2: weight of the mean router entropy
  int64_t seed = -1;              // data order, augmentation and router noise of the phase (-1 = the job seed)
  int num_labels() const;         // labels of the task
};

struct CalibrationConfig {
  SplitPart split = SplitPart::Val;
  int batches = 8;                // evaluation batches (0 = the whole split)
};

struct PruneConfig {
  Criterion criterion = Criterion::RouterNormChange;
  PruneScope scope = PruneScope::Global;
  double ratio = 0.5;             // fraction of the eligible experts to prune
  bool ratio_auto = false;        // ratio: auto: the largest ratio of the candidates below whose
                                  // accuracy on the calibration split stays within max_accuracy_drop
  double max_accuracy_drop = 1.0; // points (accuracy in %) below the unpruned model, for ratio: auto
  double auto_step = 0.125;       // ratio: auto tries step, 2*step, ... (< 1)
  int count = 0;                  // or: this many (global) / per layer (per_layer); 0 = use ratio
  int min_experts = 0;            // every MoE layer keeps at least max(top_k, min_experts)
  std::vector<int> layers;        // eligible MoE blocks (empty = all)
  PrunedRouting routing = PrunedRouting::Drop;
  bool rebalance = true;          // re-place survivors for even expected load
  bool replicate = false;         // rebalancing adds replicas of the hottest experts (prune/rebalance.h)
  double replica_memory_mb = 0;   // expert copies' memory per rank for replicas, all layers (0: what pruning freed)
  double replica_imbalance = 1.05;  // replicas are added while a layer's imbalance is above this
  int eval_top_k = 0;             // SEER-MoE: evaluate the re-fine-tuned model with this top-k (0 = model's)
  CalibrationConfig calibration;
};

// Bytes of one expert copy while training: 16 per parameter (weights, gradient,
// two optimiser moments) of 2*hidden*mlp_dim + hidden + mlp_dim parameters.
inline double expert_copy_bytes(int hidden, int mlp_dim) {
  return 16.0 * (2.0 * hidden * mlp_dim + hidden + mlp_dim);
}

struct OutputConfig {
  std::string dir = "runs/vmoe-tiny";
};

struct CheckpointConfig {
  std::string dir;                // "" = <output.dir>/checkpoints
  int every = 0;                  // save every n optimiser steps (0 = only on preemption signals)
  int keep = 3;                   // complete checkpoints kept (older ones are deleted)
  bool async = false;             // write in a background thread while training continues
};

// How the MoE layers compute (never what: every choice gives the same results up
// to float rounding). Section `runtime:`; see core/env.h for the environment
// variables that override it.
struct MoeRuntime {
  DispatcherKind dispatcher = DispatcherKind::Auto;
  ExpertGemm expert_gemm = ExpertGemm::Auto;
  // > 1: split each MoE layer's local experts into this many chunks and overlap the
  // exchange of rows with the experts (model/direct_exchange.h; CPU direct exchange
  // with the loop of experts only, identical results); 1: one exchange, then the experts.
  int dispatch_chunks = 1;
};

struct RuntimeConfig {
  MoeRuntime moe;                 // runtime.dispatcher, runtime.expert_gemm
  bool malloc_tune = true;        // keep freed host blocks up to 32 MiB in the heap (dist/world.cpp)
  bool node_memory = true;        // ranks of one node exchange rows in place (dist/node_memory.h)
  int threads = 0;                // torch intra-op threads per rank (0 = OMP_NUM_THREADS, else cores / ranks per node)
};

// How the ranks are arranged (section `parallel:`; docs/design.md "Process mesh").
struct ParallelConfig {
  // N, ranks per expert-parallel group; W / N groups hold replicas of the experts.
  // 0 = auto: the largest divisor of the world size that is at most the experts of a layer.
  int expert_parallel = 0;
  GradReduce grad_reduce = GradReduce::Overlap;  // dense gradients: overlap (buckets during backward) | flat
  double bucket_mb = 25.0;                         // bucket size of overlap, MiB
};

struct JobConfig {
  uint64_t seed = 0;
  ModelConfig model;
  DataConfig data;
  PhaseConfig pretrain;
  PhaseConfig finetune;
  PruneConfig prune;
  PhaseConfig refinetune;         // optional re-fine-tuning of the pruned model (enabled: false by default)
  OutputConfig output;
  CheckpointConfig checkpoint;
  RuntimeConfig runtime;
  ParallelConfig parallel;
  std::string source;             // file path, or "<embedded vmoe-tiny>"
  std::string resolved_yaml;      // the config after overrides, as YAML
  // Hash of what determines the pretrained model (seed, model, data, pretrain): a
  // cached pretrained model is reused only when it matches. FNV-1a of a canonical
  // form (sorted keys), so the same settings give the same hash on any toolchain.
  std::string pretrain_fingerprint;
};

// The embedded default (configs/vmoe-tiny.yaml compiled into the binary).
extern const char* const kEmbeddedDefaultConfig;

// path empty -> embedded default. overrides are "a.b.c=value" (value parsed as YAML).
// A file may name `base: other.yaml` (or a list of files), relative to itself: the
// bases are read first (later ones override earlier ones), then the file's own keys
// override theirs, maps merged key by key. Environment overrides (core/env.h) apply last.
JobConfig parse_config(const std::string& path, const std::vector<std::string>& overrides = {});
// yaml_text has no file of its own: a `base:` in it is relative to the working directory.
JobConfig parse_config_text(const std::string& yaml_text, const std::string& source_name,
                            const std::vector<std::string>& overrides = {});
void validate(const JobConfig& cfg);
// The expert-parallel size for `world_size` ranks: `requested` when > 0 (it must
// divide world_size and be at most min_experts), else the largest divisor of
// world_size that is at most min_experts. UserError naming what was wrong.
int resolve_expert_parallel(int requested, int world_size, int min_experts);

// resolve_expert_parallel for cfg's parallel.expert_parallel and its smallest MoE layer.
int expert_parallel_of(const JobConfig& cfg, int world_size);

// Checks that cfg can run on world_size ranks (process mesh, batch splits) and
// returns the expert-parallel size N (parallel.expert_parallel, resolved).
int validate_world(const JobConfig& cfg, int world_size);
// The seed of a phase's data order, augmentation and router noise.
uint64_t phase_seed(const JobConfig& cfg, const PhaseConfig& phase);
// <checkpoint.dir> or <output.dir>/checkpoints.
std::string checkpoint_dir(const JobConfig& cfg);

}  // namespace moeprune
