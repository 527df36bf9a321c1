#include "dist/node_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "core/error.h"

namespace moeprune {
namespace {

std::atomic<bool> g_enabled{true};
constexpr size_t kPage = 4096;
constexpr size_t kHeader = kPage;  // the first page holds the cookie peers check

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Virtual size of a segment: twice a rank's share of the node's memory, at least
// 1 GiB (pages exist only once touched; every rank maps every segment, so the
// address space taken is twice the node's memory whatever the number of ranks).
// A rank that needs more falls back to MPI for the rows that do not fit.
size_t segment_size(int ranks) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const size_t phys = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : size_t{1} << 34;
  return round_up(std::max<size_t>(2 * phys / static_cast<size_t>(std::max(ranks, 1)), size_t{1} << 30),
                  size_t{2} << 20);
}

}  // namespace

void set_node_memory_enabled(bool on) { g_enabled = on; }
bool node_memory_enabled() { return g_enabled; }

std::shared_ptr<NodeMemory> NodeMemory::create(MPI_Comm comm, std::string* why) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  std::shared_ptr<NodeMemory> m(new NodeMemory());
  m->rank_ = rank;
  m->bases_.assign(static_cast<size_t>(size), nullptr);
  std::string reason;
  // 1. Every rank on this node, and the feature on.
  int ok = g_enabled ? 1 : 0;
  if (!ok) reason = "runtime.node_memory is off";
  MPI_Comm node = MPI_COMM_NULL;
  int node_size = 0;
  if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &node_size);
    MPI_Comm_free(&node);
  }
  if (ok && node_size != size) ok = 0, reason = concat("the ", size, " ranks span more than one node");
  // 2. This rank's segment.
  m->bytes_ = segment_size(size);
  uint64_t cookie = 0;
  if (ok) {
    m->fd_ = memfd_create("moeprune-node-memory", MFD_CLOEXEC);
    if (m->fd_ < 0 || ftruncate(m->fd_, static_cast<off_t>(m->bytes_)) != 0) {
      ok = 0, reason = concat("memfd_create/ftruncate: ", std::strerror(errno));
    } else {
      void* p = mmap(nullptr, m->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, m->fd_, 0);
      if (p == MAP_FAILED) {
        ok = 0, reason = concat("mmap: ", std::strerror(errno));
      } else {
        m->bases_[static_cast<size_t>(rank)] = static_cast<char*>(p);
        madvise(p, m->bytes_, MADV_HUGEPAGE);  // huge pages where the kernel gives them to shared memory (shmem_enabled)
        cookie = (static_cast<uint64_t>(getpid()) << 32) ^
                 static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                 reinterpret_cast<uintptr_t>(p);
        std::memcpy(p, &cookie, sizeof cookie);
      }
    }
  }
  // 3. Every rank maps every other rank's segment and checks its cookie (a pid of
  // another node would name another process).
  int64_t mine[4] = {ok, static_cast<int64_t>(getpid()), m->fd_, static_cast<int64_t>(cookie)};
  std::vector<int64_t> all(4 * static_cast<size_t>(size));
  MPI_Allgather(mine, 4, MPI_INT64_T, all.data(), 4, MPI_INT64_T, comm);
  for (int r = 0; r < size; ++r)
    if (all[4 * static_cast<size_t>(r)] == 0) ok = 0;
  for (int r = 0; r < size && ok; ++r) {
    if (r == rank) continue;
    const int64_t* e = &all[4 * static_cast<size_t>(r)];
    const std::string path = concat("/proc/", e[1], "/fd/", e[2]);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    struct stat st {};
    if (fd < 0 || fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != m->bytes_) {
      ok = 0, reason = concat("cannot open rank ", r, "'s segment (", path, "): ", std::strerror(errno));
      if (fd >= 0) close(fd);
      break;
    }
    void* p = mmap(nullptr, m->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
      ok = 0, reason = concat("mmap of rank ", r, "'s segment: ", std::strerror(errno));
      break;
    }
    m->bases_[static_cast<size_t>(r)] = static_cast<char*>(p);
    uint64_t seen = 0;
    std::memcpy(&seen, p, sizeof seen);
    if (seen != static_cast<uint64_t>(e[3])) ok = 0, reason = concat("rank ", r, "'s segment is not the one it made");
  }
  MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, comm);
  if (!ok) {
    if (why) *why = reason.empty() ? "another rank could not take part" : reason;
    return nullptr;  // the destructor unmaps what was mapped
  }
  m->free_[kHeader] = m->bytes_ - kHeader;
  return m;
}

NodeMemory::~NodeMemory() {
  for (char* b : bases_)
    if (b) munmap(b, bytes_);
  if (fd_ >= 0) close(fd_);
}

void* NodeMemory::allocate(size_t bytes) {
  const size_t n = round_up(std::max<size_t>(bytes, 1), kPage);
  std::lock_guard<std::mutex> lock(mu_);
  if (n > limit_ || in_use_ > limit_ - n) return nullptr;
  for (auto it = free_.begin(); it != free_.end(); ++it) {  // first fit: few blocks live at a time
    if (it->second < n) continue;
    const size_t off = it->first, left = it->second - n;
    free_.erase(it);
    if (left) free_[off + n] = left;
    used_[off] = n;
    in_use_ += n;
    peak_ = std::max(peak_, in_use_);
    return bases_[static_cast<size_t>(rank_)] + off;
  }
  return nullptr;
}

void NodeMemory::release(void* p) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t off = static_cast<size_t>(static_cast<char*>(p) - bases_[static_cast<size_t>(rank_)]);
  const auto u = used_.find(off);
  if (u == used_.end()) return;
  size_t start = off, n = u->second;
  used_.erase(u);
  in_use_ -= n;
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + n) n += next->second, next = free_.erase(next);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) start = prev->first, n += prev->second, free_.erase(prev);
  }
  free_[start] = n;
}

int64_t NodeMemory::offset_of(const void* p, size_t bytes) const {
  const char* base = bases_[static_cast<size_t>(rank_)];
  const auto* c = static_cast<const char*>(p);
  if (!base || c < base + kHeader || bytes > bytes_ || c + bytes > base + bytes_) return -1;
  return c - base;
}

size_t NodeMemory::in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}
void NodeMemory::set_limit(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  limit_ = bytes;
}
size_t NodeMemory::peak() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_;
}

at::Tensor node_empty(const std::shared_ptr<NodeMemory>& m, at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!m) return {};
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t bytes = static_cast<size_t>(n) * options.dtype().itemsize();
  void* p = m->allocate(bytes);
  if (!p) return {};
  std::shared_ptr<NodeMemory> keep = m;  // the mapping outlives every tensor in it
  return at::from_blob(p, sizes, [keep](void* q) { keep->release(q); }, options.device(at::kCPU));
}

}  // namespace moeprune
