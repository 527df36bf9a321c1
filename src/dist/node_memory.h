// Memory that every rank of a communicator on one node reads and writes in place:
// each rank owns a segment (a memfd, sparse: pages exist once touched) that is
// mapped into every rank's address space. The CPU direct exchange
// (model/direct_exchange.cpp) uses it so that the "network" of one node is one
// pass over the rows instead of a copy followed by a pass: senders write their
// rows straight into the receiver's buffer, and the combine reads the other ranks'
// expert outputs where their experts wrote them.
//
// Created collectively (NodeMemory::create) and only when every rank of the
// communicator shares this node and can map every other rank's segment
// (/proc/<pid>/fd of a process of the same user); otherwise, or with
// runtime.node_memory: false, it does not exist and the exchange goes through MPI.
// Blocks are kept for reuse once freed (the pages stay resident, like the heap's).
#pragma once
#include <ATen/ATen.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace moeprune {

class NodeMemory {
 public:
  // Collective over comm. Null on every rank when any rank cannot take part; `why`
  // (when given) then says why on the ranks that know.
  static std::shared_ptr<NodeMemory> create(MPI_Comm comm, std::string* why = nullptr);
  ~NodeMemory();
  NodeMemory(const NodeMemory&) = delete;
  NodeMemory& operator=(const NodeMemory&) = delete;

  // A block of `bytes` in this rank's segment (page aligned), or nullptr when the
  // segment has no room left. Thread-safe.
  void* allocate(size_t bytes);
  void release(void* p);
  // Where [p, p + bytes) lies in this rank's segment, or -1 when it is not inside it.
  int64_t offset_of(const void* p, size_t bytes) const;
  // The base of rank r's segment as mapped in this process.
  char* segment(int r) const { return bases_[static_cast<size_t>(r)]; }
  size_t segment_bytes() const { return bytes_; }
  // Bytes of this rank's segment in use now and at most so far.
  size_t in_use() const;
  size_t peak() const;
  // At most `bytes` in use at a time from now on (tests: the paths for no room left).
  void set_limit(size_t bytes);

 private:
  NodeMemory() = default;
  int rank_ = 0;
  size_t bytes_ = 0;
  int fd_ = -1;
  std::vector<char*> bases_;
  mutable std::mutex mu_;
  std::map<size_t, size_t> free_;            // offset -> bytes, coalesced
  std::unordered_map<size_t, size_t> used_;  // offset -> bytes
  size_t in_use_ = 0, peak_ = 0, limit_ = SIZE_MAX;
};

// runtime.node_memory: whether communicators may create node memory (World applies it).
void set_node_memory_enabled(bool on);
bool node_memory_enabled();

// An uninitialised CPU tensor of `sizes` in m's segment of this rank, or an
// undefined tensor when there is no room (the caller allocates elsewhere).
at::Tensor node_empty(const std::shared_ptr<NodeMemory>& m, at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace moeprune
