// Reading a job config: YAML text or files (with `base:` inheritance), "--set"
// overrides and environment overrides into the typed JobConfig. Every key is read
// through a MapReader, so an unknown key is reported with the keys that were
// expected there (and the base file it came from).
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <set>

#include "core/config.h"
#include "core/env.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/phase.h"
#include "core/yaml_tree.h"

namespace moeprune {
namespace {

namespace fs = std::filesystem;

// Reads the keys of one YAML map, remembering which were used, so that unknown
// keys can be reported with the list of expected ones.
class MapReader {
 public:
  MapReader(const YAML::Node& node, std::string path, const Origins* origins)
      : node_(node), path_(std::move(path)), origins_(origins) {
    require(!node_ || node_.IsNull() || node_.IsMap(),
            concat("config: '", path_.empty() ? "<top level>" : path_, "' must be a mapping", from(path_)));
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
      throw UserError(concat("config: '", full(key), "' has value '", dump(v), "', expected ", type_name<T>(),
                             from(full(key))));
    }
    if constexpr (std::is_floating_point_v<T>) {
      require_finite(key, v, out);
    } else if constexpr (is_vector<T>::value) {
      if constexpr (std::is_floating_point_v<typename T::value_type>)
        for (const auto& x : out) require_finite(key, v, x);
    }
  }

  // A choice from a name table (core/choices.h).
  template <class E>
  void choice(const std::string& key, E& out) {
    std::string text(name_of(out));
    get(key, text);
    out = parse_choice<E>(text, concat("config: ", full(key)));
  }

  YAML::Node child(const std::string& key) {
    known_.insert(key);
    if (!node_ || node_.IsNull()) return YAML::Node();
    return node_[key];
  }
  MapReader sub(const std::string& key) { return MapReader(child(key), full(key), origins_); }

  std::string full(const std::string& key) const { return join_key(path_, key); }

  void finish() const {
    if (!node_ || node_.IsNull()) return;
    for (const auto& kv : node_) {
      const std::string key = key_text(kv.first, path_);
      if (!known_.count(key)) {
        std::string expected;
        for (const auto& k : known_) expected += (expected.empty() ? "" : ", ") + k;
        throw UserError(concat("config: unknown key '", full(key), "'", from(full(key)), " (expected one of: ",
                               expected, ")"));
      }
    }
  }

 private:
  std::string from(const std::string& path) const {
    if (!origins_) return "";
    const auto it = origins_->find(path);
    return it == origins_->end() ? "" : concat(" in ", it->second);
  }
  // NaN and infinities are never meaningful settings (they would run to a NaN loss).
  void require_finite(const std::string& key, const YAML::Node& v, double x) const {
    require(std::isfinite(x), concat("config: '", full(key), "' has value '", dump(v), "', expected a finite number",
                                     from(full(key))));
  }
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
  const Origins* origins_;
  std::set<std::string> known_;
};

void read_moe(MapReader r, MoeConfig& m) {
  r.get("num_experts", m.num_experts);
  r.get("top_k", m.top_k);
  r.get("every", m.every);
  r.get("last", m.last);
  r.get("capacity_factor", m.capacity_factor);
  r.get("noise_std", m.noise_std);
  r.get("router_init_std", m.router_init_std);
  r.get("bpr", m.bpr);
  r.get("group_size", m.group_size);
  r.get("importance_loss_weight", m.importance_loss_weight);
  r.get("load_loss_weight", m.load_loss_weight);
  r.get("ensemble_size", m.ensemble_size);
  r.finish();
}

void read_model(MapReader r, ModelConfig& m) {
  r.get("name", m.name);
  r.get("image_size", m.image_size);
  r.get("channels", m.channels);
  r.get("patch_size", m.patch_size);
  r.get("hidden", m.hidden);
  r.get("mlp_dim", m.mlp_dim);
  r.get("num_layers", m.num_layers);
  r.get("num_heads", m.num_heads);
  r.get("num_classes", m.num_classes);
  r.get("representation_size", m.representation_size);
  r.get("head_bias_init", m.head_bias_init);
  read_moe(r.sub("moe"), m.moe);
  r.finish();
}

void read_data(MapReader r, DataConfig& d) {
  r.choice("dataset", d.dataset);
  r.get("root", d.root);
  r.choice("cifar100_labels", d.cifar100_labels);
  r.get("val_fraction", d.val_fraction);
  r.get("eval_batch_size", d.eval_batch_size);
  r.get("prefetch", d.prefetch);
  r.get("planted_train", d.planted_train);
  r.get("planted_test", d.planted_test);
  r.get("planted_patches", d.planted_patches);
  r.get("planted_noise", d.planted_noise);
  r.get("planted_tasks", d.planted_tasks);
  r.get("planted_prototypes", d.planted_prototypes);
  r.get("planted_seed", d.planted_seed);
  r.get("domains", d.domains);
  MapReader a = r.sub("augment");
  a.get("crop_padding", d.augment.crop_padding);
  a.get("flip", d.augment.flip);
  a.get("inception_crop", d.augment.inception_crop);
  a.get("mean", d.augment.mean);
  a.get("std", d.augment.std);
  a.finish();
  r.finish();
}

void read_phase(MapReader r, PhaseConfig& p) {
  r.get("enabled", p.enabled);
  r.get("classes", p.classes);
  r.get("label_map", p.label_map);
  r.get("init", p.init);
  r.choice("optimizer", p.optimizer);
  r.choice("precision", p.precision);
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

void read_prune(MapReader r, PruneConfig& p) {
  r.choice("criterion", p.criterion);
  r.choice("scope", p.scope);
  if (const YAML::Node v = r.child("ratio"); v && v.IsScalar() && v.Scalar() == "auto") p.ratio_auto = true;
  else r.get("ratio", p.ratio);
  r.get("max_accuracy_drop", p.max_accuracy_drop);
  r.get("auto_step", p.auto_step);
  r.get("count", p.count);
  r.get("min_experts", p.min_experts);
  r.get("layers", p.layers);
  r.choice("routing", p.routing);
  r.get("rebalance", p.rebalance);
  r.get("replicate", p.replicate);
  r.get("replica_memory_mb", p.replica_memory_mb);
  r.get("replica_imbalance", p.replica_imbalance);
  r.get("eval_top_k", p.eval_top_k);
  MapReader c = r.sub("calibration");
  c.choice("split", p.calibration.split);
  c.get("batches", p.calibration.batches);
  c.finish();
  r.finish();
}

void read_runtime(MapReader r, RuntimeConfig& rt) {
  r.choice("dispatcher", rt.moe.dispatcher);
  r.choice("expert_gemm", rt.moe.expert_gemm);
  r.get("dispatch_chunks", rt.moe.dispatch_chunks);
  r.get("malloc_tune", rt.malloc_tune);
  r.get("node_memory", rt.node_memory);
  r.get("threads", rt.threads);
  r.finish();
}

JobConfig from_tree(YAML::Node root, const std::string& source_name, const std::vector<std::string>& overrides,
                    const Origins& origins) {
  for (const auto& ov : overrides) apply_override(root, ov);
  JobConfig cfg;
  cfg.source = source_name;
  MapReader top(root, "", &origins);
  top.get("seed", cfg.seed);
  read_model(top.sub("model"), cfg.model);
  read_data(top.sub("data"), cfg.data);
  cfg.refinetune.enabled = false;  // the one phase that is off unless asked for
  for (const PhaseInfo& ph : phase_table())
    if (ph.section) read_phase(top.sub(std::string(ph.name)), cfg.*(ph.section));
  read_prune(top.sub(str(Phase::Prune)), cfg.prune);  // every phase's settings are the section of its name
  MapReader out = top.sub("output");
  out.get("dir", cfg.output.dir);
  out.finish();
  MapReader ck = top.sub("checkpoint");
  ck.get("dir", cfg.checkpoint.dir);
  ck.get("every", cfg.checkpoint.every);
  ck.get("keep", cfg.checkpoint.keep);
  ck.get("async", cfg.checkpoint.async);
  ck.finish();
  read_runtime(top.sub("runtime"), cfg.runtime);
  MapReader par = top.sub("parallel");
  par.get("expert_parallel", cfg.parallel.expert_parallel);
  par.choice("grad_reduce", cfg.parallel.grad_reduce);
  par.get("bucket_mb", cfg.parallel.bucket_mb);
  par.finish();
  top.finish();
  apply_env_overrides(cfg.runtime);
  validate(cfg);
  YAML::Emitter all;
  all << root;
  cfg.resolved_yaml = all.c_str();
  YAML::Node fp(YAML::NodeType::Sequence);
  for (const std::string& k : {std::string("seed"), std::string("model"), std::string("data"), str(Phase::Pretrain)})
    fp.push_back(root[k]);
  cfg.pretrain_fingerprint = hex64(fnv1a64(canonical(fp)));
  return cfg;
}

// text (named `name`) with its bases (relative to dir), overrides and environment.
// chain: the files being read, for cycle detection.
JobConfig parse(const std::string& text, const std::string& name, const fs::path& dir,
                std::vector<std::string> chain, const std::vector<std::string>& overrides, bool file) {
  Origins origins;
  YAML::Node root = resolve_bases(load_text(text, name, file), name, dir, chain, origins);
  return from_tree(root, name, overrides, origins);
}

}  // namespace

JobConfig parse_config_text(const std::string& yaml_text, const std::string& source_name,
                            const std::vector<std::string>& overrides) {
  return parse(yaml_text, source_name, fs::current_path(), {}, overrides, /*file=*/false);
}

JobConfig parse_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return parse_config_text(kEmbeddedDefaultConfig, "<embedded vmoe-tiny>", overrides);
  return parse(read_file(path), path, fs::path(path).parent_path(), {fs::weakly_canonical(path).string()}, overrides,
               /*file=*/true);
}

}  // namespace moeprune
