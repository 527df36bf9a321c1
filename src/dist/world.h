// The processes of one job: MPI initialisation, rank / size / local rank, the
// device each rank computes on, the communicators, and the abort path that turns
// an error on any rank into the end of every rank (never a hang).
#pragma once
#include <c10/core/Device.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "dist/communicator.h"

namespace moeprune {

// The two communicators a computation needs: one for tensors on the compute
// device (NCCL or MPI) and one for host-side figures (MPI). Tests build one from
// SelfCommunicators to get the single-process reference.
struct Comms {
  Communicator* device = nullptr;
  Communicator* host = nullptr;
  int rank() const { return host->rank(); }
  int size() const { return host->size(); }
};

// A UserError that every rank has seen and agreed on (World::agree): ends the job
// with exit code 2 without MPI_Abort.
class AgreedUserError : public UserError {
 public:
  using UserError::UserError;
};

// Collective over host: every rank's string, on every rank.
std::vector<std::string> all_gather_strings(Communicator& host, const std::string& mine);
// Collective over host: when any rank's `error` is not empty, every rank throws the
// same AgreedUserError, "<what> (rank r): <the lowest failing rank's error><suffix>":
// a failure one rank saw (a full or read-only file system) ends the job with one
// line on every rank and exit code 2, never with one rank aborting while the others
// wait in a collective.
void agree_on_error(Communicator& host, const std::string& error, const std::string& what,
                    const std::string& suffix = "");

class World {
 public:
  // Initialises MPI (thread level FUNNELED: only the main thread calls MPI) and
  // picks the device: cuda:local_rank when GPUs are visible and use_gpus, else the
  // CPU (the multi-rank test suite runs on CPUs on any machine).
  World(int* argc, char*** argv, bool use_gpus = true);
  ~World();  // MPI_Finalize
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  c10::Device device() const { return device_; }

  // The communicator for tensors on device() (NCCL for CUDA, MPI for CPU).
  Communicator& comm() { return device_comm_ ? *device_comm_ : *mpi_; }
  // Host communicator (always MPI).
  MpiCommunicator& host_comm() { return *mpi_; }

  // Collective: true when ok is true on every rank. Use after work every rank
  // does (config validation) so that an error seen by some ranks ends all of them.
  bool all_ok(bool ok);

  // Runs fn on every rank (work on replicated input: loading data, checking files).
  // A UserError on any rank is logged on the ranks that saw it and rethrown on
  // every rank as AgreedUserError, so all ranks exit with code 2 and none hangs.
  void agree(const std::function<void()>& fn);

  Comms comms() { return Comms{&comm(), mpi_.get()}; }

  // Ends every rank with `code` after logging msg on this rank. Never returns.
  [[noreturn]] void abort(int code, const std::string& msg);

  // The process-level runtime settings: torch's intra-op threads (resolve_threads)
  // and the host allocator tuning (runtime.malloc_tune).
  void apply_runtime(const RuntimeConfig& rt);

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  c10::Device device_{c10::kCPU};
  MPI_Comm local_comm_ = MPI_COMM_NULL;
  std::unique_ptr<MpiCommunicator> mpi_;
  std::unique_ptr<Communicator> device_comm_;
};

// Runs body on every rank. A UserError on every rank (all reached the check) is
// printed once per rank and gives exit code 2 after a clean MPI_Finalize; any other
// exception aborts every rank with the failing rank's message. Returns the exit code.
int run_ranks(World& world, const std::function<int(World&)>& body);

}  // namespace moeprune
