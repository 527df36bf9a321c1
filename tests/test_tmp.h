// Fresh temporary directories for tests: unique per call (mkdtemp), removed when
// the object goes out of scope, so two runs of the suite never collide and
// nothing stays behind.
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <string>
#include <vector>

#include "dist/communicator.h"

namespace moeprune::test {

class TempDir {
 public:
  // <system temp>/moeprune-<name>-XXXXXX
  explicit TempDir(const std::string& name) : path_(make(name)) {}
  // One directory for every rank of comm: rank 0 makes it and tells the others;
  // rank 0 removes it (call after the last collective that uses it).
  TempDir(const std::string& name, Communicator& comm) : comm_(&comm) {
    std::string p = comm.rank() == 0 ? make(name) : std::string();
    at::Tensor len = at::tensor({static_cast<int64_t>(p.size())}, at::kLong);
    comm.broadcast(len, 0);
    at::Tensor bytes = at::zeros({len.item<int64_t>()}, at::kByte);
    if (comm.rank() == 0) std::copy(p.begin(), p.end(), bytes.data_ptr<uint8_t>());
    comm.broadcast(bytes, 0);
    path_.assign(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(bytes.numel()));
  }
  ~TempDir() {
    if (comm_) comm_->barrier();
    if (!comm_ || comm_->rank() == 0) {
      std::error_code ec;
      std::filesystem::remove_all(path_, ec);
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& child) const { return path_ + "/" + child; }

 private:
  static std::string make(const std::string& name) {
    std::string tmpl = (std::filesystem::temp_directory_path() / ("moeprune-" + name + "-XXXXXX")).string();
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
    return buf.data();
  }
  std::string path_;
  Communicator* comm_ = nullptr;
};

}  // namespace moeprune::test
