#include "ckpt/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"

namespace moeprune {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kFormat = "moeprune-checkpoint";

std::string expert_file(int rank) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "experts-r%05d.safetensors", rank);
  return buf;
}


// "blocks.3.moe.experts.w1", id 5 -> "blocks.3.moe.experts.e5.w1"
std::string expert_name(const std::string& stacked, int id) {
  const auto dot = stacked.rfind('.');
  return concat(stacked.substr(0, dot), ".e", id, stacked.substr(dot));
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::string to_hex(const at::Tensor& bytes) {
  static const char* d = "0123456789abcdef";
  std::string s;
  const auto* p = bytes.data_ptr<uint8_t>();
  for (int64_t i = 0; i < bytes.numel(); ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

at::Tensor from_hex(const std::string& s) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size() / 2)}, at::kByte);
  auto* p = t.data_ptr<uint8_t>();
  for (size_t i = 0; i + 1 < s.size(); i += 2) p[i / 2] = static_cast<uint8_t>(std::stoi(s.substr(i, 2), nullptr, 16));
  return t;
}

json stats_json(const std::map<int, LayerStats>& m) {
  json out = json::object();
  for (const auto& [layer, s] : m)
    out[std::to_string(layer)] = {{"assigned", s.assigned}, {"kept", s.kept}, {"soft", s.soft}, {"tokens", s.tokens}};
  return out;
}

std::map<int, LayerStats> stats_from(const json& j) {
  std::map<int, LayerStats> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    LayerStats s;
    s.assigned = it.value().at("assigned").get<std::vector<int64_t>>();
    s.kept = it.value().at("kept").get<std::vector<int64_t>>();
    s.soft = it.value().at("soft").get<std::vector<double>>();
    s.tokens = it.value().at("tokens").get<int64_t>();
    out[std::stoi(it.key())] = s;
  }
  return out;
}

// Tensors of this rank's part of a checkpoint, copied to host memory.
struct Snapshot {
  NamedTensors dense;    // rank 0 only
  NamedTensors experts;  // this rank's experts
};

Snapshot snapshot(const VisionTransformer& model, const Optimizer& opt, const RouterHistory* history, int rank) {
  at::NoGradGuard ng;
  Snapshot s;
  auto host = [](const at::Tensor& t) { return t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true); };
  std::map<std::string, const ParamSlot*> slots;
  for (const auto& slot : const_cast<Optimizer&>(opt).slots()) slots[slot.name] = &slot;
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    const ParamSlot* slot = slots.count(name) ? slots.at(name) : nullptr;
    if (!is_expert_param(name)) {
      if (rank != 0) continue;
      s.dense.emplace_back(name, host(item.value()));
      if (slot && slot->m1.defined()) s.dense.emplace_back("optim.m1." + name, host(slot->m1));
      if (slot && slot->m2.defined()) s.dense.emplace_back("optim.m2." + name, host(slot->m2));
      continue;
    }
    const int block = block_of_param(name);
    std::vector<int> ids;
    for (const auto& l : model->moe_layers())
      if (l->layer() == block) ids = l->experts->expert_ids();
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string en = expert_name(name, ids[i]);
      s.experts.emplace_back(en, host(item.value()[static_cast<int64_t>(i)]));
      if (slot && slot->m1.defined()) s.experts.emplace_back("optim.m1." + en, host(slot->m1[static_cast<int64_t>(i)]));
      if (slot && slot->m2.defined()) s.experts.emplace_back("optim.m2." + en, host(slot->m2[static_cast<int64_t>(i)]));
    }
  }
  if (rank == 0 && history)
    for (const auto& [block, ref] : history->reference())
      s.dense.emplace_back(concat("history.reference.", block), host(ref));
  return s;
}

CheckpointFile write_file(const std::string& dir, const std::string& name, const NamedTensors& tensors) {
  const std::string path = dir + "/" + name;
  CheckpointFile f;
  f.name = name;
  f.bytes = write_safetensors(path, tensors, {{"format", kFormat}}, /*fsync_file=*/true);
  f.crc32 = file_crc32(path);
  return f;
}

int next_sequence(const std::string& root) {
  int seq = 0;
  if (!fs::exists(root)) return 1;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0) seq = std::max(seq, std::atoi(n.c_str() + 5));
  }
  return seq + 1;
}

std::vector<std::string> complete_checkpoints(const std::string& root) {
  std::vector<std::string> out;
  if (!fs::exists(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0 && fs::exists(e.path() / "manifest.json")) out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

uint32_t file_crc32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), concat("checkpoint: cannot read '", path, "'"));
  std::vector<char> buf(1 << 22);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = in.gcount();
    if (n > 0) crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
  }
  return static_cast<uint32_t>(crc);
}

// ---------------------------------------------------------------------------
struct CheckpointWriter::Pending {
  std::string name, tmp;
  Snapshot snap;
  TrainState state;
  json manifest;  // everything but "files"
  std::thread worker;
  std::atomic<bool> done{false};
  std::string error;
  std::vector<CheckpointFile> files;  // this rank's
  std::chrono::steady_clock::time_point start;
  int64_t bytes = 0;
};

CheckpointWriter::CheckpointWriter(Comms comms, std::string root, int keep, bool async)
    : comms_(comms), root_(std::move(root)), keep_(keep), async_(async) {}

CheckpointWriter::~CheckpointWriter() {
  if (!pending_) return;
  if (pending_->worker.joinable()) pending_->worker.join();
  log::warn(concat("checkpoint ", pending_->name, " was written but never completed (no poll after save); ",
                   "it stays in ", pending_->tmp, " and is ignored"));
}

void CheckpointWriter::save(const VisionTransformer& model, const Optimizer& opt, const TrainState& state,
                            const JobConfig& cfg, const RouterHistory* history) {
  poll(/*wait=*/true);  // one save at a time
  const int rank = comms_.rank();
  auto p = std::make_unique<Pending>();
  p->start = std::chrono::steady_clock::now();
  p->state = state;
  // Rank 0 names the checkpoint and creates its temporary directory.
  at::Tensor seq = at::zeros({1}, at::kLong);
  if (rank == 0) {
    fs::create_directories(root_);
    seq[0] = next_sequence(root_);
  }
  comms_.host->broadcast(seq, 0);
  char name[128];
  std::snprintf(name, sizeof name, "ckpt-%06lld-%s-step%08lld", static_cast<long long>(seq[0].item<int64_t>()),
                state.phase.c_str(), static_cast<long long>(state.step));
  p->name = name;
  p->tmp = root_ + "/.tmp-" + p->name;
  if (rank == 0) {
    fs::remove_all(p->tmp);
    fs::create_directories(p->tmp);
  }
  comms_.host->barrier();
  p->snap = snapshot(model, opt, history, rank);

  if (rank == 0) {
    json layers = json::array();
    for (const auto& l : model->moe_layers()) {
      const Placement& pl = l->placement();
      layers.push_back({{"block", l->layer()}, {"experts", l->expert_ids()}, {"rank", pl.expert_rank()}});
    }
    auto gen = at::detail::getDefaultCPUGenerator();
    json hist = json::array();
    if (history)
      for (const auto& r : history->records()) hist.push_back(json::parse(RouterHistory::to_json(r)));
    p->manifest = {
        {"format", kFormat},
        {"version", kCheckpointVersion},
        {"phase", state.phase},
        {"step", state.step},
        {"epoch", state.epoch},
        {"loader_step", state.loader_step},
        {"finished_phases", state.finished_phases},
        {"seed", cfg.seed},
        {"config", cfg.resolved_yaml},
        {"num_classes", model->config().num_classes},
        {"world_size", comms_.size()},
        {"optimizer", {{"kind", cfg.finetune.optimizer}, {"steps", const_cast<Optimizer&>(opt).steps_taken()}}},
        {"moe_layers", layers},
        {"pruned_routing", model->config().pruned_routing},
        {"history", {{"counts", history ? stats_json(history->counts()) : json::object()}, {"records", hist}}},
        {"rng", {{"scheme", "counter-based: loader (seed, epoch, step), router noise (seed, phase, micro-step)"},
                 {"torch_cpu_state", to_hex(gen.get_state())}}}};
    if (state.phase == "pretrain") p->manifest["optimizer"]["kind"] = cfg.pretrain.optimizer;
  }

  Pending* raw = p.get();
  auto write = [raw, rank]() {
    try {
      if (rank == 0) raw->files.push_back(write_file(raw->tmp, "dense.safetensors", raw->snap.dense));
      raw->files.push_back(write_file(raw->tmp, expert_file(rank), raw->snap.experts));
    } catch (const std::exception& e) {
      raw->error = e.what();
    }
    raw->snap = Snapshot{};  // free the host copies
    raw->done = true;
  };
  pending_ = std::move(p);
  if (async_) {
    pending_->worker = std::thread(write);
  } else {
    write();
    poll(/*wait=*/true);
  }
}

bool CheckpointWriter::poll(bool wait) {
  if (!pending_) {
    // Still a collective: other ranks may have something pending (they never do
    // without this rank, but the call pattern stays symmetric).
    return true;
  }
  if (wait && pending_->worker.joinable()) pending_->worker.join();
  at::Tensor done = at::tensor({pending_->done.load() ? 1 : 0}, at::kInt);
  comms_.host->all_reduce(done, ReduceOp::Sum);
  if (done.item<int>() < comms_.size()) return false;
  if (pending_->worker.joinable()) pending_->worker.join();
  finalize(*pending_);
  pending_.reset();
  return true;
}

void CheckpointWriter::finalize(Pending& p) {
  // Agree that every rank wrote its file.
  at::Tensor ok = at::tensor({p.error.empty() ? 0 : 1}, at::kInt);
  comms_.host->all_reduce(ok, ReduceOp::Max);
  if (ok.item<int>() != 0) {
    if (comms_.rank() == 0) fs::remove_all(p.tmp);
    throw std::runtime_error(concat("checkpoint ", p.name, " failed",
                                    p.error.empty() ? std::string(" on another rank") : ": " + p.error,
                                    "; the previous checkpoint is intact"));
  }
  // Sizes and CRCs of every rank's expert file to rank 0.
  const CheckpointFile& mine = p.files.back();
  at::Tensor info = at::tensor({mine.bytes, static_cast<int64_t>(mine.crc32)}, at::kLong);
  at::Tensor all = comms_.host->all_gather(info);
  int64_t total = 0;
  for (int r = 0; r < comms_.size(); ++r) total += all[r][0].item<int64_t>();
  if (comms_.rank() == 0) {
    json files = json::array();
    const CheckpointFile& dense = p.files.front();
    files.push_back({{"name", dense.name}, {"bytes", dense.bytes}, {"crc32", dense.crc32}});
    total += dense.bytes;
    for (int r = 0; r < comms_.size(); ++r)
      files.push_back({{"name", expert_file(r)},
                       {"bytes", all[r][0].item<int64_t>()},
                       {"crc32", static_cast<uint32_t>(all[r][1].item<int64_t>())}});
    p.manifest["files"] = files;
    const std::string mpath = p.tmp + "/manifest.json";
    {
      std::ofstream out(mpath);
      out << p.manifest.dump(1) << "\n";
      out.flush();
      require(out.good(), concat("checkpoint: cannot write '", mpath, "'"));
    }
    fsync_path(mpath);
    fsync_path(p.tmp);
    const std::string final_dir = root_ + "/" + p.name;
    fs::rename(p.tmp, final_dir);
    fsync_path(root_);
    {
      std::ofstream out(root_ + "/latest.tmp");
      out << p.name << "\n";
    }
    fsync_path(root_ + "/latest.tmp");
    fs::rename(root_ + "/latest.tmp", root_ + "/latest");
    fsync_path(root_);
    auto done = complete_checkpoints(root_);
    for (size_t i = 0; i + static_cast<size_t>(keep_) < done.size(); ++i) fs::remove_all(root_ + "/" + done[i]);
  }
  comms_.host->barrier();
  last_dir_ = root_ + "/" + p.name;
  last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - p.start).count();
  last_bytes_ = total;
  log::info(concat("checkpoint: saved ", last_dir_, " (", total / (1 << 20), " MiB, ", last_seconds_, " s)"));
}

// ---------------------------------------------------------------------------
std::string latest_checkpoint(const std::string& root) {
  const std::string ptr = root + "/latest";
  if (!fs::exists(ptr)) return "";
  std::ifstream in(ptr);
  std::string name;
  in >> name;
  require(!name.empty() && fs::exists(root + "/" + name + "/manifest.json"),
          concat("checkpoint: '", ptr, "' names '", name, "', which is not a complete checkpoint"));
  return root + "/" + name;
}

ModelConfig model_config_of(const ModelConfig& cfg, const Manifest& m) {
  ModelConfig out = cfg;
  out.num_classes = m.num_classes;
  out.pruned_routing = m.pruned_routing;
  out.kept_experts.clear();
  for (const auto& l : m.layers)
    if (static_cast<int>(l.experts.size()) != cfg.moe.num_experts) out.kept_experts[l.block] = l.experts;
  return out;
}

std::vector<Placement> placements_of(const Manifest& m, int world_size) {
  std::vector<Placement> out;
  for (const auto& l : m.layers) {
    const int n = static_cast<int>(l.experts.size());
    out.push_back(m.world_size == world_size ? Placement(l.rank, world_size)
                                             : Placement::contiguous(n, world_size, /*allow_empty=*/true));
  }
  return out;
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  require(fs::exists(path), concat("checkpoint: '", path, "' does not exist (expected a checkpoint directory)"));
  std::ifstream in(path);
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw UserError(concat("checkpoint: '", path, "' is not valid JSON (", e.what(), ")"));
  }
  require(j.value("format", "") == kFormat, concat("checkpoint: '", path, "' has format '", j.value("format", ""),
                                                   "', expected '", kFormat, "'"));
  const int version = j.value("version", -1);
  require(version == kCheckpointVersion, concat("checkpoint: '", path, "' has version ", version,
                                                ", this moeprune reads version ", kCheckpointVersion));
  Manifest m;
  m.dir = dir;
  try {
    m.version = version;
    m.state.phase = j.at("phase").get<std::string>();
    m.state.step = j.at("step").get<int64_t>();
    m.state.epoch = j.at("epoch").get<int64_t>();
    m.state.loader_step = j.at("loader_step").get<int64_t>();
    m.state.finished_phases = j.at("finished_phases").get<std::vector<std::string>>();
    m.seed = j.at("seed").get<uint64_t>();
    m.config_yaml = j.at("config").get<std::string>();
    m.num_classes = j.at("num_classes").get<int>();
    m.world_size = j.at("world_size").get<int>();
    m.optimizer = j.at("optimizer").at("kind").get<std::string>();
    m.optimizer_steps = j.at("optimizer").at("steps").get<int64_t>();
    for (const auto& l : j.at("moe_layers"))
      m.layers.push_back(ExpertLayout{l.at("block").get<int>(), l.at("experts").get<std::vector<int>>(),
                                      l.at("rank").get<std::vector<int>>()});
    m.pruned_routing = j.value("pruned_routing", "drop");
    m.history_counts = stats_from(j.at("history").at("counts"));
    m.history_records = j.at("history").at("records").dump();
    m.rng_state_hex = j.at("rng").at("torch_cpu_state").get<std::string>();
    for (const auto& f : j.at("files"))
      m.files.push_back(CheckpointFile{f.at("name").get<std::string>(), f.at("bytes").get<int64_t>(),
                                       f.at("crc32").get<uint32_t>()});
  } catch (const json::exception& e) {
    throw UserError(concat("checkpoint: '", path, "' lacks a field or has a wrong type: ", e.what()));
  }
  return m;
}

void verify_files(const Manifest& m, const std::vector<std::string>& names) {
  for (const auto& f : m.files) {
    if (!names.empty() && std::find(names.begin(), names.end(), f.name) == names.end()) continue;
    const std::string path = m.dir + "/" + f.name;
    require(fs::exists(path), concat("checkpoint: file '", path, "' listed in the manifest is missing"));
    const auto size = static_cast<int64_t>(fs::file_size(path));
    require(size == f.bytes, concat("checkpoint: '", path, "' has ", size, " bytes, the manifest says ", f.bytes,
                                    " (truncated or replaced)"));
    const uint32_t crc = file_crc32(path);
    require(crc == f.crc32, concat("checkpoint: '", path, "' has CRC-32 ", crc, ", the manifest says ", f.crc32,
                                   " (corrupt)"));
  }
}

TrainState load_checkpoint(const Manifest& m, VisionTransformer& model, Optimizer* opt, RouterHistory* history) {
  at::NoGradGuard ng;
  const auto layers = model->moe_layers();
  require(layers.size() == m.layers.size(), concat("checkpoint ", m.dir, " has ", m.layers.size(),
                                                   " MoE layers, the model has ", layers.size()));
  require(m.num_classes == model->config().num_classes,
          concat("checkpoint ", m.dir, " has a head of ", m.num_classes, " classes, the model has ",
                 model->config().num_classes));
  // Which file holds each (block, expert id).
  std::map<std::pair<int, int>, std::string> where;
  for (size_t i = 0; i < layers.size(); ++i) {
    const ExpertLayout& l = m.layers[i];
    require(l.block == layers[i]->layer(), concat("checkpoint ", m.dir, ": MoE layer ", i, " is block ", l.block,
                                                  ", the model has block ", layers[i]->layer()));
    require(l.experts == layers[i]->expert_ids(),
            concat("checkpoint ", m.dir, ": block ", l.block, " has ", l.experts.size(), " experts, the model has ",
                   layers[i]->expert_ids().size(), " (or other ids); build the model with model_config_of()"));
    for (size_t e = 0; e < l.experts.size(); ++e) where[{l.block, l.experts[e]}] = expert_file(l.rank[e]);
  }
  std::map<std::string, std::unique_ptr<SafetensorsFile>> open;
  auto file = [&](const std::string& name) -> SafetensorsFile& {
    auto it = open.find(name);
    if (it != open.end()) return *it->second;
    verify_files(m, {name});
    return *(open[name] = std::make_unique<SafetensorsFile>(m.dir + "/" + name));
  };
  auto get = [&](SafetensorsFile& f, const std::string& name, const at::IntArrayRef shape) {
    require(f.contains(name), concat("checkpoint: '", f.path(), "' has no tensor '", name, "'"));
    at::Tensor t = f.view(name);
    require(t.sizes() == shape, concat("checkpoint: '", f.path(), "' tensor '", name, "' is ", t.sizes(),
                                       ", the model needs ", shape));
    return t;
  };
  std::map<std::string, ParamSlot*> slots;
  if (opt)
    for (auto& s : opt->slots()) slots[s.name] = &s;
  SafetensorsFile& dense = file("dense.safetensors");
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    at::Tensor p = item.value();
    ParamSlot* slot = slots.count(name) ? slots.at(name) : nullptr;
    if (!is_expert_param(name)) {
      p.copy_(get(dense, name, p.sizes()));
      if (slot && dense.contains("optim.m1." + name)) slot->m1 = get(dense, "optim.m1." + name, p.sizes()).clone().to(p.device());
      if (slot && dense.contains("optim.m2." + name)) slot->m2 = get(dense, "optim.m2." + name, p.sizes()).clone().to(p.device());
      continue;
    }
    const int block = block_of_param(name);
    std::vector<int> ids;
    for (const auto& l : layers)
      if (l->layer() == block) ids = l->experts->expert_ids();
    const auto one = p.sizes().slice(1);
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string en = expert_name(name, ids[i]);
      SafetensorsFile& f = file(where.at({block, ids[i]}));
      p[static_cast<int64_t>(i)].copy_(get(f, en, one));
      for (const char* k : {"m1", "m2"}) {
        const std::string on = concat("optim.", k, ".", en);
        if (!slot || !f.contains(on)) continue;
        at::Tensor& st = std::string(k) == "m1" ? slot->m1 : slot->m2;
        if (!st.defined()) st = at::zeros_like(p);
        st[static_cast<int64_t>(i)].copy_(get(f, on, one));
      }
    }
  }
  if (opt) opt->set_steps_taken(m.optimizer_steps);
  if (history) {
    std::map<int, at::Tensor> ref;
    for (const auto& l : layers) ref[l->layer()] = dense.get(concat("history.reference.", l->layer()));
    history->restore(ref, m.history_counts, m.history_records);
  }
  if (!m.rng_state_hex.empty()) {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(from_hex(m.rng_state_hex));
  }
  return m.state;
}

std::string inspect_checkpoint(const std::string& dir) {
  const Manifest m = read_manifest(dir);
  std::ostringstream o;
  int64_t total = 0;
  for (const auto& f : m.files) total += f.bytes;
  o << "checkpoint " << dir << "\n"
    << "  format version " << m.version << ", phase " << m.state.phase << ", step " << m.state.step << " (loader epoch "
    << m.state.epoch << " step " << m.state.loader_step << ")\n"
    << "  finished phases: ";
  for (const auto& p : m.state.finished_phases) o << p << " ";
  o << "\n  saved on " << m.world_size << " ranks, seed " << m.seed << ", optimiser " << m.optimizer << " ("
    << m.optimizer_steps << " steps), head of " << m.num_classes << " classes\n";
  for (const auto& l : m.layers) {
    o << "  MoE block " << l.block << ": " << l.experts.size() << " experts";
    std::map<int, std::vector<int>> by_rank;
    for (size_t e = 0; e < l.experts.size(); ++e) by_rank[l.rank[e]].push_back(l.experts[e]);
    for (const auto& [r, ids] : by_rank) {
      o << "  r" << r << ":[";
      for (size_t i = 0; i < ids.size(); ++i) o << (i ? "," : "") << ids[i];
      o << "]";
    }
    o << "\n";
  }
  o << "  files (" << total << " bytes):\n";
  for (const auto& f : m.files) o << "    " << f.name << "  " << f.bytes << " bytes  crc32 " << f.crc32 << "\n";
  return o.str();
}

void export_checkpoint(const std::string& dir, const std::string& out) {
  const Manifest m = read_manifest(dir);
  verify_files(m);
  NamedTensors all;
  SafetensorsFile dense(dir + "/dense.safetensors");
  for (const auto& [name, e] : dense.entries()) all.emplace_back(name, dense.get(name));
  std::vector<std::unique_ptr<SafetensorsFile>> shards;
  std::map<std::string, std::map<int, at::Tensor>> stacked;  // "blocks.1.moe.experts.w1" -> id -> tensor
  for (const auto& f : m.files) {
    if (f.name == "dense.safetensors") continue;
    SafetensorsFile s(dir + "/" + f.name);
    for (const auto& [name, e] : s.entries()) {
      // "...experts.e5.w1" -> "...experts.w1", id 5
      const auto pos = name.find(".experts.e");
      const auto dot = name.find('.', pos + 10);
      const int id = std::stoi(name.substr(pos + 10, dot - pos - 10));
      stacked[name.substr(0, pos) + ".experts" + name.substr(dot)][id] = s.get(name);
    }
  }
  for (auto& [name, by_id] : stacked) {
    std::vector<at::Tensor> parts;
    for (auto& [id, t] : by_id) parts.push_back(t);
    all.emplace_back(name, at::stack(parts));
  }
  std::map<std::string, std::string> meta{{"format", "moeprune-export-v1"}, {"phase", m.state.phase},
                                          {"step", std::to_string(m.state.step)}, {"config", m.config_yaml}};
  std::string ids;
  for (const auto& l : m.layers) {
    std::vector<int> sorted = l.experts;
    std::sort(sorted.begin(), sorted.end());
    std::string s;
    for (int e : sorted) s += concat(s.empty() ? "" : ",", e);
    meta[concat("experts.block", l.block)] = s;
  }
  write_safetensors(out, all, meta, true);
}

}  // namespace moeprune
