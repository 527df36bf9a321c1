#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeprune {
namespace {

const std::vector<std::pair<std::string, at::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, at::ScalarType>> t = {
      {"F32", at::kFloat}, {"F64", at::kDouble}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},  {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},   {"BOOL", at::kBool}};
  return t;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& [n, s] : dtype_table())
    if (s == t) return n;
  throw std::invalid_argument(concat("safetensors: unsupported dtype ", t));
}

}  // namespace

int64_t write_safetensors(const std::string& path, const NamedTensors& tensors,
                          const std::map<std::string, std::string>& metadata, bool fsync_file) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  int64_t offset = 0;
  for (const auto& [name, t0] : tensors) {
    at::Tensor t = t0.detach().to(at::kCPU).contiguous();
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    if (header.contains(name)) throw std::invalid_argument(concat("safetensors: duplicate tensor name '", name, "'"));
    header[name] = {{"dtype", dtype_name(t.scalar_type())},
                    {"shape", std::vector<int64_t>(t.sizes().begin(), t.sizes().end())},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';  // data section 8-byte aligned
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error(concat("cannot write '", path, "': ", std::strerror(errno)));
  const uint64_t n = h.size();
  bool ok = std::fwrite(&n, 8, 1, f) == 1 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
  for (const auto& t : data) {
    const size_t bytes = t.numel() * t.element_size();
    if (ok && bytes) ok = std::fwrite(t.data_ptr(), 1, bytes, f) == bytes;
  }
  ok = std::fflush(f) == 0 && ok;
  if (ok && fsync_file) ok = ::fsync(fileno(f)) == 0;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) throw std::runtime_error(concat("writing '", path, "' failed: ", std::strerror(errno)));
  return static_cast<int64_t>(8 + h.size()) + offset;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY);
  require(fd_ >= 0, concat("cannot open '", path, "': ", std::strerror(errno)));
  struct stat st{};
  ::fstat(fd_, &st);
  size_ = st.st_size;
  auto fail = [&](const std::string& what) {
    throw UserError(concat("'", path, "' is not a valid safetensors file: ", what));
  };
  if (size_ < 8) {
    ::close(fd_);
    fd_ = -1;
    fail(concat("only ", size_, " bytes"));
  }
  void* m = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_PRIVATE, fd_, 0);
  if (m == MAP_FAILED) {
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(concat("cannot map '", path, "': ", std::strerror(errno)));
  }
  data_ = static_cast<const char*>(m);
  uint64_t n = 0;
  std::memcpy(&n, data_, 8);
  if (n > static_cast<uint64_t>(size_ - 8)) fail(concat("header length ", n, " exceeds the file size ", size_));
  data_start_ = 8 + static_cast<int64_t>(n);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(std::string(data_ + 8, n));
  } catch (const std::exception& e) {
    fail(concat("header is not JSON (", e.what(), ")"));
  }
  if (!header.is_object()) fail("header is not a JSON object");
  const int64_t data_size = size_ - data_start_;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      for (auto m2 = it.value().begin(); m2 != it.value().end(); ++m2)
        metadata_[m2.key()] = m2.value().is_string() ? m2.value().get<std::string>() : m2.value().dump();
      continue;
    }
    try {
      Entry e;
      const std::string dt = it.value().at("dtype").get<std::string>();
      bool known = false;
      for (const auto& [name, st2] : dtype_table())
        if (name == dt) {
          e.dtype = st2;
          known = true;
        }
      if (!known) fail(concat("tensor '", it.key(), "' has unknown dtype ", dt));
      e.shape = it.value().at("shape").get<std::vector<int64_t>>();
      const auto off = it.value().at("data_offsets").get<std::vector<int64_t>>();
      if (off.size() != 2) fail(concat("tensor '", it.key(), "' data_offsets must have 2 values"));
      e.begin = off[0];
      e.end = off[1];
      int64_t numel = 1;
      for (int64_t d : e.shape) numel *= d;
      if (e.begin < 0 || e.end < e.begin || e.end > data_size)
        fail(concat("tensor '", it.key(), "' bytes [", e.begin, ", ", e.end, ") lie outside the ", data_size,
                    " data bytes (file truncated?)"));
      if (e.end - e.begin != numel * static_cast<int64_t>(c10::elementSize(e.dtype)))
        fail(concat("tensor '", it.key(), "' has ", e.end - e.begin, " bytes, its shape and dtype need ",
                    numel * static_cast<int64_t>(c10::elementSize(e.dtype))));
      entries_[it.key()] = std::move(e);
    } catch (const nlohmann::json::exception& ex) {
      fail(concat("tensor '", it.key(), "': ", ex.what()));
    }
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (data_) ::munmap(const_cast<char*>(data_), static_cast<size_t>(size_));
  if (fd_ >= 0) ::close(fd_);
}

at::Tensor SafetensorsFile::view(const std::string& name) const {
  auto it = entries_.find(name);
  require(it != entries_.end(), concat("'", path_, "' has no tensor '", name, "'"));
  const Entry& e = it->second;
  return at::from_blob(const_cast<char*>(data_ + data_start_ + e.begin), e.shape,
                       at::TensorOptions().dtype(e.dtype));
}

at::Tensor SafetensorsFile::rows(const std::string& name, int64_t begin, int64_t count) const {
  return view(name).narrow(0, begin, count);
}

}  // namespace moeprune
