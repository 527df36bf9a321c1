#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"

namespace moeprune {
namespace {

// Reads the keys of one YAML map, remembering which were used, so that unknown
// keys can be reported with the list of expected ones.
class MapReader {
 public:
  MapReader(const YAML::Node& node, std::string path) : node_(node), path_(std::move(path)) {
    require(!node_ || node_.IsNull() || node_.IsMap(),
            concat("config: '", path_.empty() ? "<top level>" : path_, "' must be a mapping"));
  }

  template <class T>
  void get(const std::string& key, T& out) {
    known_.insert(key);
    if (!node_ || node_.IsNull()) return;
    YAML::Node v = node_[key];
    if (!v) return;
    try {
      out = v.as<T>();
    } catch (const YAML::Exception&) {
      throw UserError(concat("config: '", full(key), "' has value '", dump(v), "', expected ", type_name<T>()));
    }
  }

  YAML::Node child(const std::string& key) {
    known_.insert(key);
    if (!node_ || node_.IsNull()) return YAML::Node();
    return node_[key];
  }

  std::string full(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  void finish() const {
    if (!node_ || node_.IsNull()) return;
    for (const auto& kv : node_) {
      const std::string key = kv.first.as<std::string>();
      if (!known_.count(key)) {
        std::string expected;
        for (const auto& k : known_) expected += (expected.empty() ? "" : ", ") + k;
        throw UserError(concat("config: unknown key '", full(key), "' (expected one of: ", expected, ")"));
      }
    }
  }

 private:
  static std::string dump(const YAML::Node& v) {
    YAML::Emitter e;
    e << YAML::Flow << v;
    return e.c_str();
  }
  template <class T>
  struct is_vector : std::false_type {};
  template <class T>
  struct is_vector<std::vector<T>> : std::true_type {};
  template <class T>
  static const char* type_name() {
    if constexpr (is_vector<T>::value) return "a list like [1, 2]";
    else if constexpr (std::is_same_v<T, bool>) return "true or false";
    else if constexpr (std::is_integral_v<T>) return "an integer";
    else if constexpr (std::is_floating_point_v<T>) return "a number";
    else return "a string";
  }

  YAML::Node node_;
  std::string path_;
  std::set<std::string> known_;
};

void read_moe(const YAML::Node& n, MoeConfig& m) {
  MapReader r(n, "model.moe");
  r.get("num_experts", m.num_experts);
  r.get("top_k", m.top_k);
  r.get("every", m.every);
  r.get("last", m.last);
  r.get("capacity_factor", m.capacity_factor);
  r.get("noise_std", m.noise_std);
  r.get("bpr", m.bpr);
  r.get("group_size", m.group_size);
  r.get("importance_loss_weight", m.importance_loss_weight);
  r.get("load_loss_weight", m.load_loss_weight);
  r.get("ensemble_size", m.ensemble_size);
  r.finish();
}

void read_model(const YAML::Node& n, ModelConfig& m) {
  MapReader r(n, "model");
  r.get("name", m.name);
  r.get("image_size", m.image_size);
  r.get("channels", m.channels);
  r.get("patch_size", m.patch_size);
  r.get("hidden", m.hidden);
  r.get("mlp_dim", m.mlp_dim);
  r.get("num_layers", m.num_layers);
  r.get("num_heads", m.num_heads);
  r.get("num_classes", m.num_classes);
  read_moe(r.child("moe"), m.moe);
  r.finish();
}

void read_data(const YAML::Node& n, DataConfig& d) {
  MapReader r(n, "data");
  r.get("dataset", d.dataset);
  r.get("root", d.root);
  r.get("cifar100_labels", d.cifar100_labels);
  r.get("val_fraction", d.val_fraction);
  r.get("eval_batch_size", d.eval_batch_size);
  r.get("prefetch", d.prefetch);
  r.get("planted_train", d.planted_train);
  r.get("planted_test", d.planted_test);
  r.get("planted_patches", d.planted_patches);
  r.get("planted_noise", d.planted_noise);
  MapReader a(r.child("augment"), "data.augment");
  a.get("crop_padding", d.augment.crop_padding);
  a.get("flip", d.augment.flip);
  a.get("mean", d.augment.mean);
  a.get("std", d.augment.std);
  a.finish();
  r.finish();
}

void read_phase(const YAML::Node& n, const std::string& name, PhaseConfig& p) {
  MapReader r(n, name);
  r.get("enabled", p.enabled);
  r.get("classes", p.classes);
  r.get("label_map", p.label_map);
  r.get("init", p.init);
  r.get("optimizer", p.optimizer);
  r.get("precision", p.precision);
  r.get("lr", p.lr);
  r.get("end_lr", p.end_lr);
  r.get("warmup_steps", p.warmup_steps);
  r.get("steps", p.steps);
  r.get("momentum", p.momentum);
  r.get("beta1", p.beta1);
  r.get("beta2", p.beta2);
  r.get("eps", p.eps);
  r.get("weight_decay", p.weight_decay);
  r.get("clip_norm", p.clip_norm);
  r.get("batch_size", p.batch_size);
  r.get("accumulation", p.accumulation);
  r.get("eval_every", p.eval_every);
  r.get("log_every", p.log_every);
  r.get("history_every", p.history_every);
  r.get("router_entropy_weight", p.router_entropy_weight);
  r.get("seed", p.seed);
  r.finish();
}

void validate_phase(const PhaseConfig& p, const std::string& name, const ModelConfig& m) {
  auto key = [&](const char* k) { return name + "." + k; };
  require(p.optimizer == "sgd" || p.optimizer == "adamw",
          concat("config: ", key("optimizer"), "='", p.optimizer, "', expected sgd or adamw"));
  require(p.precision == "fp32" || p.precision == "bf16",
          concat("config: ", key("precision"), "='", p.precision, "', expected fp32 or bf16"));
  require(p.lr > 0, concat("config: ", key("lr"), "=", p.lr, " must be > 0"));
  require(p.end_lr >= 0 && p.end_lr <= p.lr,
          concat("config: ", key("end_lr"), "=", p.end_lr, " must be in [0, ", key("lr"), "=", p.lr, "]"));
  require(p.steps > 0, concat("config: ", key("steps"), "=", p.steps, " must be > 0"));
  require(p.warmup_steps >= 0 && p.warmup_steps <= p.steps,
          concat("config: ", key("warmup_steps"), "=", p.warmup_steps, " must be in [0, ", key("steps"), "]"));
  require(p.batch_size > 0, concat("config: ", key("batch_size"), "=", p.batch_size, " must be > 0"));
  require(p.accumulation > 0 && p.batch_size % p.accumulation == 0,
          concat("config: ", key("accumulation"), "=", p.accumulation, " must divide ", key("batch_size"), "=",
                 p.batch_size));
  require((p.batch_size / p.accumulation) % m.moe.group_size == 0,
          concat("config: the micro-batch ", key("batch_size"), " / ", key("accumulation"), " = ",
                 p.batch_size / p.accumulation, " must be a multiple of model.moe.group_size=", m.moe.group_size,
                 " (routing groups are whole images)"));
  require(p.clip_norm >= 0 && p.weight_decay >= 0 && p.momentum >= 0 && p.momentum < 1,
          concat("config: ", name, ": clip_norm and weight_decay must be >= 0, momentum in [0, 1)"));
  require(p.log_every > 0 && p.eval_every >= 0 && p.history_every >= 0,
          concat("config: ", name, ": log_every must be > 0, eval_every and history_every >= 0"));
  require(p.label_map.empty() || p.label_map.size() == p.classes.size(),
          concat("config: ", key("label_map"), " has ", p.label_map.size(), " entries for ", p.classes.size(),
                 " classes; expected one label per class"));
  for (int l : p.label_map)
    require(l >= 0, concat("config: ", key("label_map"), " has label ", l, ", expected labels >= 0"));
  std::set<int> seen;
  for (int c : p.classes) {
    require(c >= 0, concat("config: ", key("classes"), " has class ", c, ", expected >= 0"));
    require(seen.insert(c).second, concat("config: ", key("classes"), " lists class ", c, " twice"));
  }
}

void apply_override(YAML::Node& root, const std::string& ov) {
  const auto eq = ov.find('=');
  require(eq != std::string::npos && eq > 0,
          concat("--set '", ov, "': expected key=value, for example model.moe.top_k=1"));
  const std::string key = ov.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(ov.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    throw UserError(concat("--set '", ov, "': value is not valid YAML (", e.msg, ")"));
  }
  // Walk with fresh handles: yaml-cpp node assignment rebinds, so keep a chain.
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, '.');) {
    require(!p.empty(), concat("--set '", ov, "': empty component in key '", key, "'"));
    parts.push_back(p);
  }
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = chain.back()[parts[i]];
    if (!next || next.IsNull()) {
      chain.back()[parts[i]] = YAML::Node(YAML::NodeType::Map);
      next = chain.back()[parts[i]];
    }
    require(next.IsMap(), concat("--set '", ov, "': '", parts[i], "' is not a mapping"));
    chain.push_back(next);
  }
  chain.back()[parts.back()] = value;
}

}  // namespace

int PhaseConfig::num_labels() const {
  if (!label_map.empty()) return *std::max_element(label_map.begin(), label_map.end()) + 1;
  return static_cast<int>(classes.size());
}

std::vector<int> ModelConfig::layer_experts(int block) const {
  auto it = kept_experts.find(block);
  if (it != kept_experts.end()) return it->second;
  std::vector<int> all(static_cast<size_t>(moe.num_experts));
  for (int e = 0; e < moe.num_experts; ++e) all[static_cast<size_t>(e)] = e;
  return all;
}

int ModelConfig::tokens_per_image() const {
  const int side = image_size / patch_size;
  return side * side + 1;
}

std::vector<int> ModelConfig::moe_blocks() const {
  std::vector<int> blocks;
  if (moe.every > 0) {
    for (int b = moe.every - 1; b < num_layers; b += moe.every) blocks.push_back(b);
  } else if (moe.last > 0) {
    // The last `last` odd blocks (as V-MoE's "Last-n": 1, 3, 5, ... counted from the end).
    for (int b = num_layers - 1; b >= 0 && static_cast<int>(blocks.size()) < moe.last; --b)
      if (b % 2 == 1) blocks.insert(blocks.begin(), b);
  }
  return blocks;
}

void validate(const JobConfig& cfg) {
  const ModelConfig& m = cfg.model;
  const MoeConfig& e = m.moe;
  auto positive = [](int v, const char* key) {
    require(v > 0, concat("config: ", key, "=", v, " must be a positive integer"));
  };
  positive(m.image_size, "model.image_size");
  positive(m.channels, "model.channels");
  positive(m.patch_size, "model.patch_size");
  positive(m.hidden, "model.hidden");
  positive(m.mlp_dim, "model.mlp_dim");
  positive(m.num_layers, "model.num_layers");
  positive(m.num_heads, "model.num_heads");
  positive(m.num_classes, "model.num_classes");
  positive(e.num_experts, "model.moe.num_experts");
  positive(e.top_k, "model.moe.top_k");
  positive(e.group_size, "model.moe.group_size");
  positive(e.ensemble_size, "model.moe.ensemble_size");
  require(m.image_size % m.patch_size == 0,
          concat("config: model.image_size=", m.image_size, " must be divisible by model.patch_size=", m.patch_size));
  require(m.hidden % m.num_heads == 0,
          concat("config: model.hidden=", m.hidden, " must be divisible by model.num_heads=", m.num_heads));
  require(e.every >= 0 && e.last >= 0, "config: model.moe.every and model.moe.last must be >= 0");
  require(!(e.every > 0 && e.last > 0),
          concat("config: set only one of model.moe.every (", e.every, ") and model.moe.last (", e.last,
              "); set the other to 0"));
  require(e.every > 0 || e.last > 0, "config: one of model.moe.every or model.moe.last must be > 0");
  require(e.every <= m.num_layers,
          concat("config: model.moe.every=", e.every, " is larger than model.num_layers=", m.num_layers));
  require(e.last <= m.num_layers / 2,
          concat("config: model.moe.last=", e.last, " exceeds the ", m.num_layers / 2, " odd blocks of model.num_layers=",
              m.num_layers));
  require(e.num_experts % e.ensemble_size == 0,
          concat("config: model.moe.num_experts=", e.num_experts, " must be divisible by model.moe.ensemble_size=",
              e.ensemble_size, " (each E3 member routes among its own E/M experts)"));
  const int experts_per_member = e.num_experts / e.ensemble_size;
  require(e.top_k <= experts_per_member,
          concat("config: model.moe.top_k=", e.top_k, " must be <= the experts each router chooses from (",
              experts_per_member, " = model.moe.num_experts / model.moe.ensemble_size)"));
  require(e.capacity_factor > 0,
          concat("config: model.moe.capacity_factor=", e.capacity_factor, " must be > 0"));
  require(e.noise_std >= 0, concat("config: model.moe.noise_std=", e.noise_std, " must be >= 0"));
  require(e.importance_loss_weight >= 0 && e.load_loss_weight >= 0,
          "config: model.moe.importance_loss_weight and load_loss_weight must be >= 0");
  const DataConfig& d = cfg.data;
  const std::set<std::string> datasets{"fashion_mnist", "mnist", "cifar10", "cifar100", "shards", "planted"};
  require(datasets.count(d.dataset),
          concat("config: data.dataset='", d.dataset, "', expected one of fashion_mnist, mnist, cifar10, cifar100, "
                 "shards, planted"));
  require(d.cifar100_labels == "fine" || d.cifar100_labels == "coarse",
          concat("config: data.cifar100_labels='", d.cifar100_labels, "', expected fine or coarse"));
  require(d.val_fraction >= 0 && d.val_fraction < 1,
          concat("config: data.val_fraction=", d.val_fraction, " must be in [0, 1)"));
  require(d.eval_batch_size > 0 && d.eval_batch_size % e.group_size == 0,
          concat("config: data.eval_batch_size=", d.eval_batch_size, " must be a positive multiple of "
                 "model.moe.group_size=", e.group_size));
  require(d.prefetch >= 0, "config: data.prefetch must be >= 0");
  require(d.augment.crop_padding >= 0, "config: data.augment.crop_padding must be >= 0");
  require(d.augment.mean.size() == d.augment.std.size() &&
              (d.augment.mean.size() == 1 || static_cast<int>(d.augment.mean.size()) == m.channels),
          concat("config: data.augment.mean and std need 1 or model.channels=", m.channels, " values each"));
  for (double s : d.augment.std) require(s > 0, "config: data.augment.std values must be > 0");
  require(d.planted_train > 0 && d.planted_test > 0 && d.planted_patches > 0 && d.planted_noise >= 0,
          "config: data.planted_* must be positive (noise >= 0)");
  require(cfg.checkpoint.every >= 0, concat("config: checkpoint.every=", cfg.checkpoint.every, " must be >= 0"));
  require(cfg.checkpoint.keep >= 1, concat("config: checkpoint.keep=", cfg.checkpoint.keep, " must be >= 1"));
  validate_phase(cfg.pretrain, "pretrain", m);
  validate_phase(cfg.finetune, "finetune", m);
  validate_phase(cfg.refinetune, "refinetune", m);
  const PruneConfig& p = cfg.prune;
  const std::set<std::string> criteria{"router_norm_change", "router_delta", "heavy_hitter", "soft_count", "random"};
  require(criteria.count(p.criterion), concat("config: prune.criterion='", p.criterion, "', expected one of "
                                              "router_norm_change, router_delta, heavy_hitter, soft_count, random"));
  require(p.scope == "global" || p.scope == "per_layer",
          concat("config: prune.scope='", p.scope, "', expected global or per_layer"));
  require(p.routing == "drop" || p.routing == "zero",
          concat("config: prune.routing='", p.routing, "', expected drop or zero"));
  require(p.ratio >= 0 && p.ratio < 1, concat("config: prune.ratio=", p.ratio, " must be in [0, 1)"));
  require(p.count >= 0 && p.min_experts >= 0, "config: prune.count and prune.min_experts must be >= 0");
  require(p.eval_top_k >= 0 && p.eval_top_k <= e.top_k,
          concat("config: prune.eval_top_k=", p.eval_top_k, " must be in [0, model.moe.top_k=", e.top_k, "]"));
  const auto blocks = m.moe_blocks();
  for (int b : p.layers)
    require(std::find(blocks.begin(), blocks.end(), b) != blocks.end(),
            concat("config: prune.layers lists block ", b, ", which is not an MoE block"));
  require(p.calibration.split == "val" || p.calibration.split == "train" || p.calibration.split == "test",
          concat("config: prune.calibration.split='", p.calibration.split, "', expected val, train or test"));
  require(p.calibration.batches >= 0, "config: prune.calibration.batches must be >= 0");
}

void validate_world(const JobConfig& cfg, int world_size) {
  const MoeConfig& e = cfg.model.moe;
  require(e.num_experts >= world_size,
          concat("world size ", world_size, " is larger than model.moe.num_experts=", e.num_experts,
              ": every rank must hold at least one expert of each MoE layer (expected at most ", e.num_experts,
              " ranks)"));
  auto check = [&](int images, const std::string& what) {
    const int groups = images / e.group_size;
    require(groups % world_size == 0,
            concat("world size ", world_size, " does not divide the ", groups, " routing groups of ", what, " (",
                   images, " images / model.moe.group_size=", e.group_size,
                   "): expected a world size that divides ", groups));
  };
  check(cfg.finetune.batch_size / cfg.finetune.accumulation, "a finetune micro-batch");
  if (cfg.pretrain.enabled) check(cfg.pretrain.batch_size / cfg.pretrain.accumulation, "a pretrain micro-batch");
  if (cfg.refinetune.enabled)
    check(cfg.refinetune.batch_size / cfg.refinetune.accumulation, "a refinetune micro-batch");
  check(cfg.data.eval_batch_size, "an evaluation batch (data.eval_batch_size)");
}

uint64_t phase_seed(const JobConfig& cfg, const PhaseConfig& phase) {
  return phase.seed >= 0 ? static_cast<uint64_t>(phase.seed) : cfg.seed;
}

std::string checkpoint_dir(const JobConfig& cfg) {
  return cfg.checkpoint.dir.empty() ? cfg.output.dir + "/checkpoints" : cfg.checkpoint.dir;
}

JobConfig parse_config_text(const std::string& yaml_text, const std::string& source_name,
                            const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw UserError(concat("config ", source_name, ": not valid YAML at line ", e.mark.line + 1, ": ", e.msg));
  }
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  for (const auto& ov : overrides) apply_override(root, ov);

  JobConfig cfg;
  cfg.source = source_name;
  MapReader top(root, "");
  top.get("seed", cfg.seed);
  read_model(top.child("model"), cfg.model);
  read_data(top.child("data"), cfg.data);
  read_phase(top.child("pretrain"), "pretrain", cfg.pretrain);
  read_phase(top.child("finetune"), "finetune", cfg.finetune);
  cfg.refinetune.enabled = false;
  read_phase(top.child("refinetune"), "refinetune", cfg.refinetune);
  {
    PruneConfig& p = cfg.prune;
    MapReader r(top.child("prune"), "prune");
    r.get("criterion", p.criterion);
    r.get("scope", p.scope);
    r.get("ratio", p.ratio);
    r.get("count", p.count);
    r.get("min_experts", p.min_experts);
    r.get("layers", p.layers);
    r.get("routing", p.routing);
    r.get("rebalance", p.rebalance);
    r.get("eval_top_k", p.eval_top_k);
    MapReader c(r.child("calibration"), "prune.calibration");
    c.get("split", p.calibration.split);
    c.get("batches", p.calibration.batches);
    c.finish();
    r.finish();
  }
  MapReader out(top.child("output"), "output");
  out.get("dir", cfg.output.dir);
  out.finish();
  MapReader ck(top.child("checkpoint"), "checkpoint");
  ck.get("dir", cfg.checkpoint.dir);
  ck.get("every", cfg.checkpoint.every);
  ck.get("keep", cfg.checkpoint.keep);
  ck.get("async", cfg.checkpoint.async);
  ck.finish();
  top.finish();
  validate(cfg);
  YAML::Emitter all;
  all << root;
  cfg.resolved_yaml = all.c_str();
  YAML::Emitter fp;
  fp << YAML::BeginSeq << root["seed"] << root["model"] << root["data"] << root["pretrain"] << YAML::EndSeq;
  cfg.pretrain_fingerprint = concat(std::hex, std::hash<std::string>{}(fp.c_str()));
  return cfg;
}

JobConfig parse_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return parse_config_text(kEmbeddedDefaultConfig, "<embedded vmoe-tiny>", overrides);
  std::ifstream in(path);
  require(in.good(), concat("config: cannot open '", path, "' (expected a readable YAML file)"));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config_text(ss.str(), path, overrides);
}

}  // namespace moeprune
