#include "core/config.h"

#include <yaml-cpp/yaml.h>

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
  static const char* type_name() {
    if constexpr (std::is_same_v<T, bool>) return "true or false";
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

void read_train(const YAML::Node& n, TrainConfig& t) {
  MapReader r(n, "train");
  r.get("seed", t.seed);
  r.get("batch_size", t.batch_size);
  r.finish();
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
  positive(cfg.train.batch_size, "train.batch_size");
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
  require(cfg.train.batch_size % e.group_size == 0,
          concat("config: train.batch_size=", cfg.train.batch_size, " must be a multiple of model.moe.group_size=",
              e.group_size, " (routing groups are whole images)"));
}

void validate_world(const JobConfig& cfg, int world_size) {
  const MoeConfig& e = cfg.model.moe;
  require(e.num_experts >= world_size,
          concat("world size ", world_size, " is larger than model.moe.num_experts=", e.num_experts,
              ": every rank must hold at least one expert of each MoE layer (expected at most ", e.num_experts,
              " ranks)"));
  const int groups = cfg.train.batch_size / e.group_size;
  require(groups % world_size == 0,
          concat("world size ", world_size, " does not divide the ", groups, " routing groups of a batch (train.batch_size=",
              cfg.train.batch_size, " / model.moe.group_size=", e.group_size,
              "): expected a world size that divides ", groups));
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
  read_model(top.child("model"), cfg.model);
  read_train(top.child("train"), cfg.train);
  top.finish();
  validate(cfg);
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
