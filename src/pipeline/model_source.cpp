#include "pipeline/model_source.h"

#include <filesystem>

#include "ckpt/manifest.h"
#include "ckpt/model_file.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "ckpt/vmoe_import.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/model_state.h"
#include "pipeline/job.h"

namespace moeprune {

SourceModel load_source_model(const JobConfig& cfg, const std::string& src, World& world, bool arch_from_config) {
  SourceModel out;
  out.path = src;
  out.pixel_mean = cfg.data.augment.mean;
  out.pixel_std = cfg.data.augment.std;
  std::error_code ec;
  if (src == "random") {
    out.kind = SourceKind::Random;
    out.model = build_job_model(cfg, cfg.model, default_placements(cfg.model, world.ep_size()), world, true);
    out.description = concat("a randomly initialised ", cfg.model.name, " (seed ", cfg.seed, ")");
    return out;
  }
  if (VmoeCheckpoint::is_prefix(src)) {
    out.kind = SourceKind::Vmoe;
    out.pixel_mean = out.pixel_std = {0.5};  // vmoe's value_range(-1, 1)
    std::unique_ptr<VmoeCheckpoint> ck;
    ModelConfig mc;
    world.agree([&] {
      ck = std::make_unique<VmoeCheckpoint>(src);
      mc = arch_from_config ? cfg.model : vmoe_model_config(*ck, cfg.model);
      check_vmoe_leaves(*ck, mc, /*new_head=*/false);
    });
    out.model = build_job_model(cfg, mc, default_placements(mc, world.ep_size()), world, true);
    VmoeLoadReport rep;
    world.agree([&] { rep = load_vmoe(*ck, out.model, /*new_head=*/false); });
    out.description = concat("vmoe checkpoint ", src, " (version ", ck->version().empty() ? "none" : ck->version(), ", ",
                             ck->leaves().size(), " arrays, ", ck->num_parameters(), " parameters in ",
                             ck->shard_count(), " data file(s)); rank 0 read ", rep.elements, " values");
    return out;
  }
  if (std::filesystem::is_directory(src, ec)) {
    out.kind = SourceKind::Checkpoint;
    Manifest m;
    world.agree([&] {
      // A directory of vmoe files (the prefix's directory): name the prefix.
      for (const auto& e : std::filesystem::directory_iterator(src, ec))
        if (e.path().extension() == ".index" && !std::filesystem::exists(src + "/manifest.json")) VmoeCheckpoint probe(src);
      m = read_manifest(resolve_checkpoint(src));
    });
    out.path = m.dir;
    // The model as it was trained: architecture and routing settings from the
    // checkpoint's own config (the job's data, runtime and seed stay).
    JobConfig saved = cfg;
    world.agree([&] {
      const JobConfig c = parse_config_text(m.config_yaml, concat("<config of checkpoint ", m.dir, ">"));
      saved.model = c.model;
      out.pixel_mean = c.data.augment.mean;
      out.pixel_std = c.data.augment.std;
    });
    out.model = build_saved_model(saved, m, world, true);
    ModelState state(out.model);
    world.agree([&] { load_checkpoint(m, {&state}); });
    out.description = concat("checkpoint ", m.dir, " (phase ", m.phase, ", step ", m.step, ", saved on ", m.world_size,
                             " ranks)");
    return out;
  }
  out.kind = SourceKind::ModelFile;
  ModelConfig mc = cfg.model;
  world.agree([&] {
    require(std::filesystem::is_regular_file(src, ec),
            concat("model source '", src, "' is neither a vmoe checkpoint prefix (no '", src, ".index'), a checkpoint ",
                   "directory nor a model file"));
    const SafetensorsFile f(src);
    require(f.contains("head.weight"), concat("model file '", src, "' has no tensor 'head.weight'"));
    mc.num_classes = static_cast<int>(f.entries().at("head.weight").shape.at(0));
    mc.representation_size =
        f.contains("pre_logits.weight") ? static_cast<int>(f.entries().at("pre_logits.weight").shape.at(0)) : 0;
  });
  out.model = build_job_model(cfg, mc, default_placements(mc, world.ep_size()), world, true);
  world.agree([&] { load_model(src, out.model); });
  out.description = concat("model file ", src);
  return out;
}

}  // namespace moeprune
