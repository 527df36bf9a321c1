#include "ckpt/model_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "core/safetensors.h"

namespace moeprune {
namespace {


// "blocks.3.moe.experts.w1" -> the MoE layer of block 3.
MoeLayer layer_of(const VisionTransformer& model, const std::string& name) {
  const int block = block_of_param(name);
  for (const auto& l : model->moe_layers())
    if (l->layer() == block) return l;
  throw std::logic_error(concat("no MoE layer for ", name));
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// pos: [1, 1 + g*g, H] -> [1, 1 + n*n, H], class token kept, grid interpolated.
at::Tensor resize_pos_embed(const at::Tensor& pos, int64_t tokens) {
  const int64_t H = pos.size(2);
  const auto g = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(pos.size(1) - 1))));
  const auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(tokens - 1))));
  at::Tensor grid = pos.narrow(1, 1, g * g).reshape({1, g, g, H}).permute({0, 3, 1, 2});
  grid = at::upsample_bilinear2d(grid, {n, n}, false).permute({0, 2, 3, 1}).reshape({1, n * n, H});
  return at::cat({pos.narrow(1, 0, 1), grid}, 1);
}

}  // namespace

at::Tensor gather_expert_param(const VisionTransformer& model, const std::string& name, Communicator& host) {
  const at::Tensor* p = model->named_parameters().find(name);
  TORCH_CHECK(p && is_expert_param(name), "gather_expert_param: ", name, " is not an expert parameter");
  const at::Tensor local = p->detach().to(at::kCPU).contiguous();
  const Placement& pl = layer_of(model, name)->placement();
  // On a mesh the placement is over the N ranks of an expert-parallel group; group 0
  // (world ranks 0..N-1) holds every expert once, the other groups hold replicas.
  TORCH_CHECK(pl.world_size() <= host.size(), "gather_expert_param: placement over ", pl.world_size(), " ranks, ",
              host.size(), " in the communicator");
  if (host.rank() >= pl.world_size()) return {};
  if (host.rank() != 0) {
    host.send(local, 0, 17);
    return {};
  }
  std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end());
  shape[0] = pl.num_experts();
  at::Tensor full = at::empty(shape, local.options());
  for (int r = 0; r < pl.world_size(); ++r) {
    const auto& slots = pl.local_experts(r);
    at::Tensor part = local;
    if (r != 0) {
      std::vector<int64_t> ps = shape;
      ps[0] = static_cast<int64_t>(slots.size());
      part = at::empty(ps, local.options());
      host.recv(part, r, 17);
    }
    full.index_copy_(0, at::tensor(std::vector<int64_t>(slots.begin(), slots.end()), at::kLong), part);
  }
  return full;
}

void save_model(const std::string& path, const VisionTransformer& model, Communicator& host,
                const std::map<std::string, std::string>& metadata) {
  at::NoGradGuard ng;
  NamedTensors out;
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    if (is_expert_param(name)) {
      at::Tensor full = gather_expert_param(model, name, host);
      if (host.rank() == 0) out.emplace_back(name, full);
    } else if (host.rank() == 0) {
      out.emplace_back(name, item.value().detach().to(at::kCPU).contiguous());
    }
  }
  std::string error;
  if (host.rank() == 0) {
    const std::string tmp = path + ".tmp";
    try {
      const auto dir = std::filesystem::path(path).parent_path();
      if (!dir.empty()) std::filesystem::create_directories(dir);
      write_safetensors(tmp, out, metadata, /*fsync_file=*/true);
      std::filesystem::rename(tmp, path);
      fsync_dir(dir.string());
    } catch (const std::exception& e) {
      error = e.what();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
    }
  }
  agree_on_error(host, error, concat("cannot write the model file '", path, "'"),
                 " (is the directory writable, is there space?)");
}

std::map<std::string, std::string> load_model(const std::string& path, VisionTransformer& model,
                                              const LoadOptions& opts) {
  at::NoGradGuard ng;
  SafetensorsFile f(path);
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    at::Tensor p = item.value();
    const bool head = name.rfind("head.", 0) == 0;
    if (head && opts.new_head) continue;  // reset_head below
    require(f.contains(name), concat("model file '", path, "' has no tensor '", name, "' (was it saved from ",
                                     "another model config?)"));
    at::Tensor src = f.view(name);
    if (is_expert_param(name)) {
      const auto& ids = layer_of(model, name)->experts->expert_ids();
      require(src.dim() == p.dim() && src.sizes().slice(1) == p.sizes().slice(1),
              concat("model file '", path, "': '", name, "' is ", src.sizes(), ", the model needs [E", p.sizes().slice(1),
                     "]"));
      for (int id : ids)
        require(id < src.size(0), concat("model file '", path, "': '", name, "' has ", src.size(0),
                                         " experts, the model needs expert ", id));
      src = src.index_select(0, at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong));
    } else if (name == "pos_embed" && src.dim() == 3 && src.size(2) == p.size(2) && src.size(1) != p.size(1)) {
      src = resize_pos_embed(src.to(at::kFloat), p.size(1));
    }
    require(src.sizes() == p.sizes(), concat("model file '", path, "': '", name, "' is ", src.sizes(),
                                             ", the model needs ", p.sizes()));
    p.copy_(src);
  }
  if (opts.new_head) reset_head(model);
  return f.metadata();
}

}  // namespace moeprune
