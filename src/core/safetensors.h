// safetensors files (https://github.com/huggingface/safetensors format): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
// "__metadata__" string map, then the raw little-endian tensor bytes. Used for
// checkpoints and for the image shard format, so Python users can read every
// tensor with standard tools. Reading maps the file and checks every offset.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moeprune {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes CPU tensors (made contiguous) to path; returns the file size in bytes.
// fsync_file: flush the data to disk before returning.
int64_t write_safetensors(const std::string& path, const NamedTensors& tensors,
                          const std::map<std::string, std::string>& metadata = {}, bool fsync_file = false);

class SafetensorsFile {
 public:
  struct Entry {
    at::ScalarType dtype = at::kByte;
    std::vector<int64_t> shape;
    int64_t begin = 0, end = 0;  // byte offsets in the data section
  };

  // Maps the file; throws UserError naming the file on any inconsistency
  // (short file, bad header, offsets outside the data, size != dtype * shape).
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, Entry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  // Zero-copy view valid while this object lives.
  at::Tensor view(const std::string& name) const;
  // Owned copy.
  at::Tensor get(const std::string& name) const { return view(name).clone(); }
  // Rows [begin, begin+count) of a tensor's first dimension, zero-copy.
  at::Tensor rows(const std::string& name, int64_t begin, int64_t count) const;
  int64_t file_size() const { return size_; }

 private:
  std::string path_;
  int fd_ = -1;
  const char* data_ = nullptr;  // mapped file
  int64_t size_ = 0;
  int64_t data_start_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moeprune
