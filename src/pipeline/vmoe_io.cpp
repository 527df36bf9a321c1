#include "pipeline/vmoe_io.h"

#include <cstdio>
#include <filesystem>
#include <map>

#include "ckpt/model_file.h"
#include "ckpt/vmoe_format.h"
#include "ckpt/vmoe_import.h"
#include "core/error.h"
#include "core/log.h"
#include "core/strings.h"
#include "pipeline/model_source.h"

namespace moeprune {
namespace {

void require_parent(const std::string& path, const char* what) {
  const auto dir = std::filesystem::path(path).parent_path();
  std::error_code ec;
  require(dir.empty() || std::filesystem::is_directory(dir, ec),
          concat(what, ": the output directory '", dir.string(), "' does not exist"));
}

// What the import read, on stdout: every array, then the model it makes.
void print_contents(const VmoeCheckpoint& ck, const ModelConfig& mc) {
  std::printf("%s", describe_vmoe(ck).c_str());
  const std::string blocks = join(mc.moe_blocks(), ",");
  std::printf("read as float32 into the model:\n");
  std::printf("model: image_size %d, patch_size %d, channels %d, hidden %d, mlp_dim %d, num_layers %d, num_heads %d, "
              "num_classes %d, representation_size %d\n",
              mc.image_size, mc.patch_size, mc.channels, mc.hidden, mc.mlp_dim, mc.num_layers, mc.num_heads,
              mc.num_classes, mc.representation_size);
  std::printf("moe: %d experts in each of blocks %s (%s), ensemble_size %d\n", mc.moe.num_experts, blocks.c_str(),
              mc.moe.every > 0 ? concat("every: ", mc.moe.every).c_str() : concat("last: ", mc.moe.last).c_str(),
              mc.moe.ensemble_size);
}

}  // namespace

int import_vmoe(World& world, const JobConfig& cfg, const std::string& prefix, const std::string& out,
                bool arch_from_config) {
  world.agree([&] {
    require(VmoeCheckpoint::is_prefix(prefix) || std::filesystem::is_directory(prefix),
            concat("ckpt import: '", prefix, ".index' does not exist (give the checkpoint prefix, the path before .index)"));
    require(!out.empty(), "ckpt import: give the output file, e.g. moeprune ckpt import PREFIX model.safetensors");
    require_parent(out, "ckpt import");
    if (!VmoeCheckpoint::is_prefix(prefix)) VmoeCheckpoint probe(prefix);  // names the prefixes in a directory
  });
  SourceModel src = load_source_model(cfg, prefix, world, arch_from_config);
  if (world.rank() == 0) {
    print_contents(VmoeCheckpoint(prefix), src.model->config());
    std::fflush(stdout);
  }
  save_model(out, src.model, world.host_comm(), {{"source", prefix}, {"source_format", "vmoe"}});
  if (world.rank() == 0) {
    std::printf("wrote %s\n", out.c_str());
    std::fflush(stdout);
  }
  return kExitOk;
}

int export_vmoe(World& world, const JobConfig& cfg, const std::string& src_path, const std::string& out_prefix,
                int num_shards) {
  world.agree([&] {
    require(!out_prefix.empty(), "ckpt export-vmoe: give the output prefix, e.g. moeprune ckpt export-vmoe DIR out/ckpt");
    require(num_shards >= 1, concat("ckpt export-vmoe: --shards ", num_shards, " must be >= 1"));
    require_parent(out_prefix, "ckpt export-vmoe");
  });
  SourceModel src = load_source_model(cfg, src_path, world);
  std::map<std::string, at::Tensor> params;
  world.agree([&] { params = vmoe_params(src.model, world.host_comm()); });
  if (world.rank() == 0) {
    write_vmoe_checkpoint(out_prefix, params, num_shards, src.model->config().moe.num_experts);
    int64_t n = 0;
    for (const auto& [k, v] : params) n += v.numel();
    std::printf("exported %s to %s.index + %d data file(s): %zu arrays, %lld parameters\n", src.description.c_str(),
                out_prefix.c_str(), num_shards, params.size(), static_cast<long long>(n));
    std::fflush(stdout);
  }
  world.host_comm().barrier();
  return kExitOk;
}

}  // namespace moeprune
