#include "data/dataset.h"

#include <ATen/CPUGeneratorImpl.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/pixel_code.h"
#include "core/safetensors.h"

namespace moeprune {
namespace fs = std::filesystem;

TensorDataset::TensorDataset(at::Tensor images, std::vector<int64_t> labels, int num_classes, std::string n)
    : images_(std::move(images)), labels_(std::move(labels)), classes_(num_classes) {
  name = std::move(n);
  TORCH_CHECK(images_.dim() == 4 && images_.scalar_type() == at::kByte, "TensorDataset: images must be uint8 NCHW");
  TORCH_CHECK(static_cast<int64_t>(labels_.size()) == images_.size(0), "TensorDataset: label count mismatch");
}

at::Tensor TensorDataset::images(const std::vector<int64_t>& idx) const {
  return images_.index_select(0, at::tensor(idx, at::kLong));
}

namespace {

// Reads a whole file through zlib, which passes raw (uncompressed) files through.
std::vector<uint8_t> read_maybe_gz(const std::string& path) {
  require(fs::exists(path), concat("data: missing file '", path, "'"));
  gzFile f = gzopen(path.c_str(), "rb");
  require(f != nullptr, concat("data: cannot open '", path, "'"));
  std::vector<uint8_t> out;
  std::vector<uint8_t> buf(1 << 20);
  int n = 0;
  while ((n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()))) > 0) out.insert(out.end(), buf.begin(), buf.begin() + n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  const bool bad = n < 0 || (err != Z_OK && err != Z_STREAM_END);
  const std::string what = msg ? msg : "";
  gzclose(f);
  require(!bad, concat("data: '", path, "' is corrupt or truncated (", what, ")"));
  return out;
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string find_file(const std::string& root, const std::vector<std::string>& names) {
  for (const auto& n : names)
    if (fs::exists(fs::path(root) / n)) return (fs::path(root) / n).string();
  std::string tried;
  for (const auto& n : names) tried += (tried.empty() ? "" : ", ") + n;
  throw UserError(concat("data: none of [", tried, "] found in '", root, "'"));
}

}  // namespace

std::shared_ptr<TensorDataset> read_idx(const std::string& images_path, const std::string& labels_path,
                                        int num_classes, const std::string& name) {
  const auto img = read_maybe_gz(images_path);
  const auto lab = read_maybe_gz(labels_path);
  require(img.size() >= 16 && be32(img.data()) == 0x00000803,
          concat("data: '", images_path, "' is not an IDX image file (magic 0x00000803 expected)"));
  require(lab.size() >= 8 && be32(lab.data()) == 0x00000801,
          concat("data: '", labels_path, "' is not an IDX label file (magic 0x00000801 expected)"));
  const int64_t n = be32(img.data() + 4), h = be32(img.data() + 8), w = be32(img.data() + 12);
  const int64_t nl = be32(lab.data() + 4);
  require(static_cast<int64_t>(img.size()) == 16 + n * h * w,
          concat("data: '", images_path, "' has ", img.size() - 16, " pixel bytes, its header promises ", n, "x", h,
                 "x", w, " (truncated?)"));
  require(static_cast<int64_t>(lab.size()) == 8 + nl,
          concat("data: '", labels_path, "' has ", lab.size() - 8, " labels, its header promises ", nl,
                 " (truncated?)"));
  require(n == nl, concat("data: '", images_path, "' has ", n, " images but '", labels_path, "' has ", nl, " labels"));
  std::vector<int64_t> labels(lab.begin() + 8, lab.end());
  for (int64_t i = 0; i < nl; ++i)
    require(labels[i] < num_classes, concat("data: '", labels_path, "' label ", labels[i], " at example ", i,
                                            " is outside [0, ", num_classes, ")"));
  at::Tensor images = at::empty({n, 1, h, w}, at::kByte);
  std::memcpy(images.data_ptr(), img.data() + 16, static_cast<size_t>(n * h * w));
  return std::make_shared<TensorDataset>(images, std::move(labels), num_classes, name);
}

namespace {

std::shared_ptr<TensorDataset> read_cifar_records(const std::vector<std::string>& files, int label_bytes,
                                                  int label_byte, int num_classes, const std::string& name) {
  const int64_t rec = label_bytes + 3072;
  std::vector<uint8_t> all;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    require(in.good(), concat("data: cannot open '", f, "'"));
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    require(bytes.size() % rec == 0 && !bytes.empty(),
            concat("data: '", f, "' has ", bytes.size(), " bytes, expected a multiple of the ", rec,
                   "-byte CIFAR record (truncated?)"));
    all.insert(all.end(), bytes.begin(), bytes.end());
  }
  const int64_t n = static_cast<int64_t>(all.size()) / rec;
  at::Tensor images = at::empty({n, 3, 32, 32}, at::kByte);
  auto* dst = images.data_ptr<uint8_t>();
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* r = all.data() + i * rec;
    labels[i] = r[label_byte];
    require(labels[i] < num_classes, concat("data: ", name, " example ", i, " has label ", labels[i],
                                            ", outside [0, ", num_classes, ")"));
    std::memcpy(dst + i * 3072, r + label_bytes, 3072);
  }
  return std::make_shared<TensorDataset>(images, std::move(labels), num_classes, name);
}

std::string cifar_dir(const std::string& root, const std::string& sub, const std::string& probe) {
  if (fs::exists(fs::path(root) / probe)) return root;
  if (fs::exists(fs::path(root) / sub / probe)) return (fs::path(root) / sub).string();
  throw UserError(concat("data: '", probe, "' not found in '", root, "' or '", root, "/", sub, "'"));
}

}  // namespace

std::shared_ptr<TensorDataset> read_cifar10(const std::string& root, const std::string& split) {
  const std::string dir =
      cifar_dir(root, "cifar-10-batches-bin", split == "train" ? "data_batch_1.bin" : "test_batch.bin");
  std::vector<std::string> files;
  if (split == "train")
    for (int i = 1; i <= 5; ++i) files.push_back(concat(dir, "/data_batch_", i, ".bin"));
  else
    files.push_back(dir + "/test_batch.bin");
  return read_cifar_records(files, 1, 0, 10, "cifar10/" + split);
}

std::shared_ptr<TensorDataset> read_cifar100(const std::string& root, const std::string& split, bool coarse) {
  const std::string dir = cifar_dir(root, "cifar-100-binary", split + ".bin");
  return read_cifar_records({concat(dir, "/", split, ".bin")}, 2, coarse ? 0 : 1, coarse ? 20 : 100,
                            "cifar100/" + split);
}

std::shared_ptr<TensorDataset> make_planted(int64_t n, int image_size, int patch_size, int patches, double noise,
                                            uint64_t seed, int channels, int tasks, int prototypes) {
  const int side = image_size / patch_size, P = side * side, D = patch_size * patch_size;
  TORCH_CHECK(patches <= P, "planted: more planted patches than patches");
  TORCH_CHECK(tasks >= 1 && 2 * tasks + 2 <= D, "planted: ", tasks, " tasks need ", 2 * tasks + 2,
              " orthonormal features, a patch has ", D, " pixels");
  // Features are fixed by a seed of their own: train and test share them. Rows
  // 0..2T-1: the label features (task t: 2t, 2t+1); 2T, 2T+1: the distractors.
  auto fgen = at::make_generator<at::CPUGeneratorImpl>(12345);
  at::Tensor feats = std::get<0>(at::linalg_qr(at::randn({D, 2 * tasks + 2}, fgen))).t().contiguous();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor x = at::randn({n, P, D}, gen) * noise;
  at::Tensor y = at::randint(2, {n}, gen, at::TensorOptions().dtype(at::kLong));
  at::Tensor distract = at::randint(2, {n, P}, gen, at::TensorOptions().dtype(at::kLong));  // which distractor
  at::Tensor on = at::rand({n, P}, gen) < 0.5;
  x += (feats.index_select(0, distract.flatten() + 2 * tasks).reshape({n, P, D}) * on.unsqueeze(2)) * 2.0;
  // The label feature appears with a random sign, so no linear read-out of the
  // patches separates the classes: the nonlinear layers (the experts) must.
  at::Tensor sign = at::randint(2, {n}, gen, at::TensorOptions().dtype(at::kLong)) * 2 - 1;
  // Several tasks: each image belongs to one, its label is 2 * task + y (drawn only
  // when tasks > 1, so that one task is the same stream as before).
  if (tasks > 1) y += at::randint(tasks, {n}, gen, at::TensorOptions().dtype(at::kLong)) * 2;
  if (prototypes > 0) {
    // The lookup task: task t's K prototypes are random unit vectors in a subspace of
    // its own (d rows of an orthonormal basis, d = (D - 2) / T), each with a random
    // label bit; an image carries one of its task's prototypes. The label of a
    // prototype is a random function of its direction, so no linear read-out of the
    // patch learns it: a per-token nonlinear lookup, the MLPs' (the experts') kind of
    // work (attention alone learns it only in part: docs/results.md), and tasks live
    // in separate subspaces a router can tell apart.
    const int d = (D - 2) / tasks;
    auto pgen = at::make_generator<at::CPUGeneratorImpl>(777);
    at::Tensor basis = std::get<0>(at::linalg_qr(at::randn({D, D}, pgen))).t().contiguous();
    at::Tensor coef = at::randn({tasks, prototypes, d}, pgen);
    coef = coef / coef.norm(2, {2}, true);
    at::Tensor bits = at::randint(2, {tasks, prototypes}, pgen, at::TensorOptions().dtype(at::kLong));
    std::vector<at::Tensor> per_task;
    for (int t = 0; t < tasks; ++t) per_task.push_back(at::matmul(coef[t], basis.narrow(0, d * t, d)));
    const at::Tensor proto = at::stack(per_task);  // [T, K, D]
    const at::Tensor task = y.div(2, "floor");
    const at::Tensor which = at::randint(prototypes, {n}, gen, at::TensorOptions().dtype(at::kLong));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = task[i].item<int64_t>(), k = which[i].item<int64_t>();
      y[i] = 2 * t + bits[t][k].item<int64_t>();
      at::Tensor where = at::randperm(P, gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, patches);
      x[i].index_copy_(0, where,
                       proto[t][k].unsqueeze(0).expand({patches, D}) * 4.0 + at::randn({patches, D}, gen) * noise);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor where = at::randperm(P, gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, patches);
      at::Tensor row = x[i];
      row.index_copy_(0, where,
                      feats[y[i].item<int64_t>()].unsqueeze(0).expand({patches, D}) * (4.0 * sign[i].item<double>()) +
                          at::randn({patches, D}, gen) * noise);
    }
  }
  // [n, P, D] -> image [n, 1, S, S], quantised to uint8 around 128.
  at::Tensor img = x.reshape({n, side, side, patch_size, patch_size}).permute({0, 1, 3, 2, 4})
                       .reshape({n, 1, image_size, image_size});
  img = (img * 24.0 + 128.0).round().clamp(0, 255).to(at::kByte);
  if (channels > 1) img = img.expand({n, channels, image_size, image_size});
  std::vector<int64_t> labels(y.data_ptr<int64_t>(), y.data_ptr<int64_t>() + n);
  return std::make_shared<TensorDataset>(img.contiguous(), std::move(labels), 2 * tasks, "planted");
}

namespace {

// Image shards: <root>/<split>-NNNNN.safetensors with "images" U8 [n, H, W, C] and
// "labels" I64 [n]; metadata num_classes. Pixels stay in the mapped files.
class ShardDataset final : public Dataset {
 public:
  ShardDataset(const std::string& root, const std::string& split) {
    name = "shards/" + split;
    require(fs::is_directory(root), concat("data: shard directory '", root, "' does not exist (see docs/data.md)"));
    std::vector<std::string> paths;
    for (const auto& e : fs::directory_iterator(root)) {
      const std::string f = e.path().filename().string();
      if (f.rfind(split + "-", 0) == 0 && e.path().extension() == ".safetensors") paths.push_back(e.path().string());
    }
    std::sort(paths.begin(), paths.end());
    require(!paths.empty(), concat("data: no '", split, "-*.safetensors' shards in '", root, "'"));
    for (const auto& p : paths) {
      auto f = std::make_unique<SafetensorsFile>(p);
      require(f->contains("images") && f->contains("labels"),
              concat("data: shard '", p, "' needs tensors 'images' (U8 [n,H,W,C]) and 'labels' (I64 [n])"));
      const auto& im = f->entries().at("images");
      const auto& lb = f->entries().at("labels");
      require(im.dtype == at::kByte && im.shape.size() == 4 && lb.dtype == at::kLong && lb.shape.size() == 1 &&
                  lb.shape[0] == im.shape[0],
              concat("data: shard '", p, "' has images ", im.shape.size(), "-d or labels of another length; expected "
                     "U8 [n,H,W,C] and I64 [n]"));
      std::vector<int64_t> s{im.shape[3], im.shape[1], im.shape[2]};
      if (shape_.empty()) shape_ = s;
      require(s == shape_, concat("data: shard '", p, "' images are not the size of the first shard"));
      const auto meta = f->metadata().find("num_classes");
      require(meta != f->metadata().end(), concat("data: shard '", p, "' lacks metadata num_classes"));
      classes_ = std::stoi(meta->second);
      at::Tensor l = f->view("labels");
      for (int64_t i = 0; i < l.size(0); ++i) {
        const int64_t v = l[i].item<int64_t>();
        require(v >= 0 && v < classes_, concat("data: shard '", p, "' label ", v, " at row ", i, " is outside [0, ",
                                               classes_, ")"));
        labels_.push_back(v);
        where_.push_back({static_cast<int32_t>(files_.size()), i});
      }
      files_.push_back(std::move(f));
    }
  }
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  int num_classes() const override { return classes_; }
  std::vector<int64_t> shape() const override { return shape_; }
  const std::vector<int64_t>& labels() const override { return labels_; }
  at::Tensor images(const std::vector<int64_t>& idx) const override {
    at::Tensor out = at::empty({static_cast<int64_t>(idx.size()), shape_[1], shape_[2], shape_[0]}, at::kByte);
    for (size_t i = 0; i < idx.size(); ++i) {
      const auto& [f, row] = where_.at(static_cast<size_t>(idx[i]));
      out[static_cast<int64_t>(i)].copy_(files_[f]->view("images")[row]);
    }
    return out.permute({0, 3, 1, 2}).contiguous();
  }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::pair<int32_t, int64_t>> where_;
  std::vector<int64_t> labels_, shape_;
  int classes_ = 0;
};

// The base data set through K pixel codes, interleaved: example i is base example
// i / K under code i % K, so that every contiguous run of examples (the last
// val_fraction of a task, a training batch in file order) holds every domain alike.
class DomainDataset final : public Dataset {
 public:
  DomainDataset(std::shared_ptr<Dataset> base, const std::vector<std::string>& codes)
      : base_(std::move(base)), k_(static_cast<int64_t>(codes.size())) {
    const int C = base_->num_classes();
    name = concat(base_->name, " x ", k_, " domains");
    for (const auto& code : codes) {
      const PixelCode t = pixel_code(code);
      tables_.push_back(at::tensor(std::vector<uint8_t>(t.begin(), t.end()), at::kByte));
    }
    labels_.reserve(static_cast<size_t>(base_->size() * k_));
    for (int64_t i = 0; i < base_->size(); ++i)
      for (int64_t d = 0; d < k_; ++d) labels_.push_back(d * C + base_->labels()[static_cast<size_t>(i)]);
  }
  int64_t size() const override { return base_->size() * k_; }
  int num_classes() const override { return static_cast<int>(k_) * base_->num_classes(); }
  std::vector<int64_t> shape() const override { return base_->shape(); }
  const std::vector<int64_t>& labels() const override { return labels_; }
  at::Tensor images(const std::vector<int64_t>& idx) const override {
    std::vector<int64_t> base_idx(idx.size());
    for (size_t j = 0; j < idx.size(); ++j) base_idx[j] = idx[j] / k_;
    at::Tensor img = base_->images(base_idx);
    at::Tensor out = at::empty_like(img);
    for (int64_t d = 0; d < k_; ++d) {  // one table look-up per domain present
      std::vector<int64_t> rows;
      for (size_t j = 0; j < idx.size(); ++j)
        if (idx[j] % k_ == d) rows.push_back(static_cast<int64_t>(j));
      if (rows.empty()) continue;
      const at::Tensor r = at::tensor(rows, at::kLong);
      out.index_copy_(0, r, tables_[static_cast<size_t>(d)].index({img.index_select(0, r).to(at::kLong)}));
    }
    return out;
  }

 private:
  std::shared_ptr<Dataset> base_;
  int64_t k_;
  std::vector<at::Tensor> tables_;  // one uint8 [256] table per domain
  std::vector<int64_t> labels_;
};

std::shared_ptr<Dataset> base_dataset(const JobConfig& cfg, SplitPart part) {
  const DataConfig& d = cfg.data;
  const bool train = part != SplitPart::Test;  // train and val share the training file
  const std::string split = train ? "train" : "test";
  switch (d.dataset) {
    case DatasetKind::FashionMnist:
    case DatasetKind::Mnist: {
      const std::string p = train ? "train" : "t10k";
      const std::string img = find_file(d.root, {p + "-images-idx3-ubyte.gz", p + "-images-idx3-ubyte"});
      const std::string lab = find_file(d.root, {p + "-labels-idx1-ubyte.gz", p + "-labels-idx1-ubyte"});
      return read_idx(img, lab, 10, concat(name_of(d.dataset), "/", split));
    }
    case DatasetKind::Cifar10: return read_cifar10(d.root, split);
    case DatasetKind::Cifar100: return read_cifar100(d.root, split, d.cifar100_labels == Cifar100Labels::Coarse);
    case DatasetKind::Shards: return std::make_shared<ShardDataset>(d.root, split);
    case DatasetKind::Planted: break;
  }
  // planted: test uses another seed than train.
  return make_planted(train ? d.planted_train : d.planted_test, cfg.model.image_size, cfg.model.patch_size,
                      d.planted_patches, d.planted_noise, (d.planted_seed >= 0 ? static_cast<uint64_t>(d.planted_seed) : cfg.seed) * 2 + (train ? 1 : 2),
                      cfg.model.channels, d.planted_tasks, d.planted_prototypes);
}

}  // namespace

std::shared_ptr<Dataset> load_dataset(const JobConfig& cfg, SplitPart part) {
  std::shared_ptr<Dataset> base = base_dataset(cfg, part);
  if (cfg.data.domains.empty()) return base;
  return std::make_shared<DomainDataset>(std::move(base), cfg.data.domains);
}

Split make_split(std::shared_ptr<const Dataset> data, const PhaseConfig& task, const std::string& phase,
                 SplitPart part, double val_fraction) {
  Split s;
  s.name = concat(phase, "/", name_of(part));
  std::vector<int64_t> to_label(data->num_classes(), -1);
  if (task.classes.empty()) {
    for (int c = 0; c < data->num_classes(); ++c) to_label[c] = task.label_map.empty() ? c : -1;
    require(task.label_map.empty(), concat("config: ", phase, ".label_map needs ", phase, ".classes"));
    s.num_labels = data->num_classes();
  } else {
    for (size_t i = 0; i < task.classes.size(); ++i) {
      const int c = task.classes[i];
      require(c < data->num_classes(), concat("config: ", phase, ".classes has class ", c, ", but ", data->name,
                                              " has classes 0..", data->num_classes() - 1));
      to_label[c] = task.label_map.empty() ? static_cast<int64_t>(i) : task.label_map[i];
    }
    s.num_labels = task.num_labels();
  }
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < data->size(); ++i)
    if (to_label[data->labels()[i]] >= 0) idx.push_back(i);
  if (part != SplitPart::Test) {
    const auto n_train = static_cast<int64_t>(std::llround(static_cast<double>(idx.size()) * (1.0 - val_fraction)));
    if (part == SplitPart::Train) idx.resize(n_train);
    else idx.erase(idx.begin(), idx.begin() + n_train);
  }
  require(!idx.empty(), concat("data: the ", s.name, " split of ", data->name, " is empty (classes and val_fraction)"));
  s.index = idx;
  for (int64_t i : idx) s.label.push_back(to_label[data->labels()[i]]);
  s.data = std::move(data);
  return s;
}

}  // namespace moeprune
