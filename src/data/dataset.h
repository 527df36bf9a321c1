// Image classification data sets held as uint8 pixels, their readers (IDX,
// CIFAR binary, safetensors image shards, the planted synthetic task) and task
// splits: a class subset with its label map and the train / val / test part.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"

namespace moeprune {

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual int num_classes() const = 0;
  virtual std::vector<int64_t> shape() const = 0;  // {C, H, W} of one image
  // Class of every example, in [0, num_classes).
  virtual const std::vector<int64_t>& labels() const = 0;
  // idx: example indices -> [n, C, H, W] uint8.
  virtual at::Tensor images(const std::vector<int64_t>& idx) const = 0;
  std::string name;
};

// All pixels in memory: images [N, C, H, W] uint8, labels in [0, classes).
class TensorDataset final : public Dataset {
 public:
  TensorDataset(at::Tensor images, std::vector<int64_t> labels, int num_classes, std::string name);
  int64_t size() const override { return images_.size(0); }
  int num_classes() const override { return classes_; }
  std::vector<int64_t> shape() const override { return {images_.size(1), images_.size(2), images_.size(3)}; }
  const std::vector<int64_t>& labels() const override { return labels_; }
  at::Tensor images(const std::vector<int64_t>& idx) const override;
  const at::Tensor& all_images() const { return images_; }

 private:
  at::Tensor images_;
  std::vector<int64_t> labels_;
  int classes_;
};

// IDX (MNIST, Fashion-MNIST) image and label files, gzip-compressed or raw.
std::shared_ptr<TensorDataset> read_idx(const std::string& images_path, const std::string& labels_path,
                                        int num_classes, const std::string& name);
// CIFAR-10 binary batches (data_batch_1..5.bin / test_batch.bin) in root or
// root/cifar-10-batches-bin; split "train" or "test".
std::shared_ptr<TensorDataset> read_cifar10(const std::string& root, const std::string& split);
// CIFAR-100 binary (train.bin / test.bin) in root or root/cifar-100-binary; fine or coarse labels.
std::shared_ptr<TensorDataset> read_cifar100(const std::string& root, const std::string& split, bool coarse);
// The pruning paper's setting: binary labels decided by a label feature (with a
// random sign, so that only a nonlinear read-out separates the classes) planted in
// `patches` random patches; every patch also carries a shared distractor feature
// half of the time, and Gaussian noise. Deterministic in seed. channels > 1: the grey
// image repeated in every channel (for models with RGB patch embeddings).
// tasks > 1: each image belongs to one of `tasks` binary tasks with label features
// of their own, labelled 2 * task + class (2 * tasks classes): a broad source task
// whose tasks a narrow downstream task (two of the classes) can be cut from.
// prototypes > 0: each task is a lookup of that many prototypes (random directions
// in a subspace of the task's own, each with a random label bit) instead.
std::shared_ptr<TensorDataset> make_planted(int64_t n, int image_size, int patch_size, int patches, double noise,
                                            uint64_t seed, int channels = 1, int tasks = 1, int prototypes = 0);
// The dataset named by cfg.data holding `part`: the training file for train and val, the test file for test.
std::shared_ptr<Dataset> load_dataset(const JobConfig& cfg, SplitPart part);

// The examples of one task and part: index[i] is the dataset example, label[i] its task label.
struct Split {
  std::shared_ptr<const Dataset> data;
  std::vector<int64_t> index;
  std::vector<int64_t> label;
  std::string name;  // e.g. "finetune/val"
  int num_labels = 0;
  int64_t size() const { return static_cast<int64_t>(index.size()); }
};

// part: train (first 1 - val_fraction of the task's training examples), val (the
// rest, as V-MoE's train[98%:]) or test (the test set). phase: the config section
// of the task, for names and messages.
Split make_split(std::shared_ptr<const Dataset> data, const PhaseConfig& task, const std::string& phase,
                 SplitPart part, double val_fraction);

}  // namespace moeprune
