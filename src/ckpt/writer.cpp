#include "ckpt/writer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <set>
#include <thread>

#include "ckpt/manifest.h"
#include "ckpt/store.h"
#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"

namespace moeprune {
namespace fs = std::filesystem;
using json = nlohmann::json;

// A StateWriter that copies everything to host memory now, to be written later.
// (Not in an anonymous namespace: CheckpointWriter::Pending holds one.)
class CheckpointSnapshot final : public StateWriter {
 public:
  // writes_experts: false on the ranks of expert-data-parallel groups other than the
  // first (their experts are replicas of group 0's: each expert is written once).
  CheckpointSnapshot(int rank, bool writes_experts) : rank_(rank), writes_experts_(writes_experts) {}
  void begin(const std::string& key) {
    if (sections_.contains(key)) throw std::logic_error(concat("checkpoint: two state owners use the key '", key, "'"));
    sections_[key] = json::object();
    key_ = key;
  }
  void replicated(const std::string& name, const at::Tensor& t) override {
    unique(name);
    if (rank_ == 0) dense_.emplace_back(name, host(t));  // written once, by rank 0
  }
  void expert(const std::string& name, int block, int id, const at::Tensor& t) override {
    const std::string stored = expert_tensor_name(name, id);
    unique(stored);
    if (!writes_experts_) return;
    experts_.emplace_back(stored, host(t));
    auto& ids = held_[block];
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  }
  json& meta() override { return sections_[key_]; }

  NamedTensors dense_, experts_;
  std::map<int, std::vector<int>> held_;  // block -> ids this rank wrote
  json sections_ = json::object();

 private:
  static at::Tensor host(const at::Tensor& t) { return t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true); }
  void unique(const std::string& name) {
    if (!names_.insert(name).second) throw std::logic_error(concat("checkpoint: the tensor '", name, "' is saved twice"));
  }
  int rank_;
  bool writes_experts_;
  std::string key_;
  std::set<std::string> names_;
};

namespace {

CheckpointFile write_file(const std::string& dir, const std::string& name, const NamedTensors& tensors) {
  const std::string path = dir + "/" + name;
  CheckpointFile f;
  f.name = name;
  f.bytes = write_safetensors(path, tensors, {{"format", kCheckpointFormat}}, /*fsync_file=*/true);
  f.crc32 = file_crc32(path);
  return f;
}

}  // namespace

// A file-system failure while saving ends the job with one line on every rank.
constexpr const char* kSaveHint =
    "; the previous checkpoint, if any, is intact (is the directory writable, is there space?)";

struct CheckpointWriter::Pending {
  std::string name, tmp;
  std::unique_ptr<CheckpointSnapshot> snap;
  Manifest manifest;  // everything but shards and files
  std::thread worker;
  std::atomic<bool> done{false};
  std::string error;
  std::vector<CheckpointFile> files;  // this rank's
  std::chrono::steady_clock::time_point start;
};

CheckpointWriter::CheckpointWriter(Comms comms, std::string root, int keep, bool async)
    : comms_(comms), root_(std::move(root)), keep_(keep), async_(async) {}

CheckpointWriter::~CheckpointWriter() {
  if (!pending_) return;
  if (pending_->worker.joinable()) pending_->worker.join();
  log::warn(concat("checkpoint ", pending_->name, " was written but never completed (no poll after save); ",
                   "it stays in ", pending_->tmp, " and is ignored"));
}

void CheckpointWriter::save(const std::vector<const StateOwner*>& owners, const std::string& phase, int64_t step,
                            const std::string& config_yaml) {
  poll(/*wait=*/true);  // one save at a time
  const int rank = comms_.rank();
  auto p = std::make_unique<Pending>();
  p->start = std::chrono::steady_clock::now();
  // Rank 0 names the checkpoint and creates its temporary directory.
  at::Tensor seq = at::zeros({1}, at::kLong);
  std::string error;
  if (rank == 0) {
    try {
      fs::create_directories(root_);
      seq[0] = next_sequence(root_);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_on_error(*comms_.host, error, concat("checkpoint: cannot create a checkpoint under '", root_, "'"), kSaveHint);
  comms_.host->broadcast(seq, 0);
  p->name = checkpoint_name(seq[0].item<int64_t>(), phase, step);
  p->tmp = root_ + "/.tmp-" + p->name;
  if (rank == 0) {
    try {
      fs::remove_all(p->tmp);
      fs::create_directories(p->tmp);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_on_error(*comms_.host, error, concat("checkpoint: cannot create '", p->tmp, "'"), kSaveHint);
  p->snap = std::make_unique<CheckpointSnapshot>(rank, comms_.writes_experts());
  {
    at::NoGradGuard ng;
    for (const StateOwner* o : owners) {
      p->snap->begin(o->state_key());
      o->save_state(*p->snap);
    }
  }
  p->manifest.phase = phase;
  p->manifest.step = step;
  p->manifest.world_size = comms_.size();
  p->manifest.expert_parallel = comms_.ep_size();
  p->manifest.config_yaml = config_yaml;
  p->manifest.state = p->snap->sections_;

  Pending* raw = p.get();
  auto write = [raw, rank, experts = comms_.writes_experts()]() {
    try {
      if (rank == 0) raw->files.push_back(write_file(raw->tmp, kDenseFile, raw->snap->dense_));
      if (experts) raw->files.push_back(write_file(raw->tmp, expert_file(rank), raw->snap->experts_));
    } catch (const std::exception& e) {
      raw->error = e.what();
    }
    raw->snap->dense_.clear();  // free the host copies
    raw->snap->experts_.clear();
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
  if (!pending_) return true;
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
    std::error_code ec;
    if (comms_.rank() == 0) fs::remove_all(p.tmp, ec);
    agree_on_error(*comms_.host, p.error, concat("checkpoint ", p.name, " failed"), kSaveHint);
  }
  // Every expert-writing rank's file (group 0 of the mesh: ranks 0..N-1): size, CRC
  // and the experts it holds, to rank 0.
  std::string info_mine;
  if (comms_.writes_experts()) {
    const CheckpointFile& mine = p.files.back();
    json held = json::object();
    for (const auto& [block, ids] : p.snap->held_) held[std::to_string(block)] = ids;
    info_mine = json{{"bytes", mine.bytes}, {"crc32", mine.crc32}, {"experts", held}}.dump();
  }
  const std::vector<std::string> all = all_gather_strings(*comms_.host, info_mine);
  int64_t total = 0;
  Manifest& m = p.manifest;
  if (comms_.rank() == 0) m.files.push_back(p.files.front());
  for (int r = 0; r < comms_.ep_size(); ++r) {
    const json info = json::parse(all[static_cast<size_t>(r)]);
    const CheckpointFile f{expert_file(r), info.at("bytes").get<int64_t>(), info.at("crc32").get<uint32_t>()};
    ExpertShard shard{f.name, r, {}};
    for (auto it = info.at("experts").begin(); it != info.at("experts").end(); ++it)
      shard.experts[std::stoi(it.key())] = it.value().get<std::vector<int>>();
    m.shards.push_back(std::move(shard));
    m.files.push_back(f);
  }
  for (const auto& f : m.files) total += f.bytes;
  std::string error;
  if (comms_.rank() == 0) {
    try {
      write_manifest(p.tmp + "/manifest.json", m);
      fsync_path(p.tmp);
      fs::rename(p.tmp, root_ + "/" + p.name);
      fsync_path(root_);
      publish(root_, p.name, keep_);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_on_error(*comms_.host, error, concat("checkpoint ", p.name, " failed"), kSaveHint);
  last_dir_ = root_ + "/" + p.name;
  last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - p.start).count();
  last_bytes_ = total;
  log::info(concat("checkpoint: saved ", last_dir_, " (", total / (1 << 20), " MiB, ", last_seconds_, " s)"));
}

}  // namespace moeprune
