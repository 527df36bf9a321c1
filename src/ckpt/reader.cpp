#include "ckpt/reader.h"

#include <map>
#include <memory>

#include "ckpt/store.h"
#include "core/error.h"
#include "core/safetensors.h"

namespace moeprune {
namespace {

// The checkpoint's files, opened (and verified) on first use.
class Files {
 public:
  explicit Files(const Manifest& m) : m_(m) {
    for (const auto& s : m.shards)
      for (const auto& [block, ids] : s.experts)
        for (int id : ids) where_[{block, id}] = s.file;
  }
  SafetensorsFile& open(const std::string& name) {
    auto it = open_.find(name);
    if (it != open_.end()) return *it->second;
    verify_files(m_, {name});
    return *(open_[name] = std::make_unique<SafetensorsFile>(m_.dir + "/" + name));
  }
  // The shard holding expert (block, id), or "" when none does.
  std::string shard_of(int block, int id) const {
    auto it = where_.find({block, id});
    return it == where_.end() ? "" : it->second;
  }
  const Manifest& manifest() const { return m_; }

 private:
  const Manifest& m_;
  std::map<std::pair<int, int>, std::string> where_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> open_;
};

class SectionReader final : public StateReader {
 public:
  SectionReader(Files& files, const nlohmann::json& section) : files_(files), section_(section) {}
  bool has_replicated(const std::string& name) const override { return files_.open(kDenseFile).contains(name); }
  at::Tensor replicated(const std::string& name, at::IntArrayRef shape) const override {
    return checked(files_.open(kDenseFile), name, shape);
  }
  at::Tensor replicated(const std::string& name) const override {
    SafetensorsFile& f = files_.open(kDenseFile);
    require(f.contains(name), concat("checkpoint: '", f.path(), "' has no tensor '", name, "'"));
    return f.view(name);
  }
  bool has_expert(const std::string& name, int block, int id) const override {
    const std::string shard = files_.shard_of(block, id);
    return !shard.empty() && files_.open(shard).contains(expert_tensor_name(name, id));
  }
  at::Tensor expert(const std::string& name, int block, int id, at::IntArrayRef shape) const override {
    const std::string shard = files_.shard_of(block, id);
    require(!shard.empty(), concat("checkpoint ", where(), ": no shard holds expert ", id, " of MoE block ", block));
    return checked(files_.open(shard), expert_tensor_name(name, id), shape);
  }
  const nlohmann::json& meta() const override { return section_; }
  const std::string& where() const override { return files_.manifest().dir; }

 private:
  static at::Tensor checked(SafetensorsFile& f, const std::string& name, at::IntArrayRef shape) {
    require(f.contains(name), concat("checkpoint: '", f.path(), "' has no tensor '", name, "'"));
    at::Tensor t = f.view(name);
    require(t.sizes() == shape, concat("checkpoint: '", f.path(), "' tensor '", name, "' is ", t.sizes(),
                                       ", the model needs ", shape));
    return t;
  }
  Files& files_;
  const nlohmann::json& section_;
};

}  // namespace

void load_checkpoint(const Manifest& m, const std::vector<StateOwner*>& owners) {
  at::NoGradGuard ng;
  Files files(m);
  for (StateOwner* o : owners) {
    SectionReader reader(files, m.section(o->state_key()));
    o->load_state(reader);
  }
}

}  // namespace moeprune
