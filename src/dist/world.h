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

// The communicators a computation needs: for tensors on the compute device (NCCL
// or MPI) and for host-side figures (MPI), over all W ranks and over the two axes
// of the process mesh W = D x N (dist/mesh.h):
//   ep   the N consecutive ranks of this rank's expert-parallel group: they hold
//        one copy of every expert between them and exchange tokens (all-to-all);
//   edp  the D ranks at this rank's position of every group: they hold the same
//        experts and average those experts' gradients.
// Null ep pointers mean the group is the whole world (D = 1); null edp pointers
// mean no replicas. Tests build one from SelfCommunicators to get the
// single-process reference.
struct Comms {
  Communicator* device = nullptr;
  Communicator* host = nullptr;
  Communicator* ep_device = nullptr;
  Communicator* ep_host = nullptr;
  Communicator* edp_device = nullptr;
  Communicator* edp_host = nullptr;
  // All W ranks, for the dense-gradient buckets that run while backward's all-to-alls
  // use `device` (a communicator of their own, as DDP has: two NCCL streams must not
  // share one communicator). Null: device.
  Communicator* grad_device = nullptr;
  int rank() const { return host->rank(); }
  Communicator& grad() const { return grad_device ? *grad_device : *device; }
  int size() const { return host->size(); }
  Communicator& ep() const { return ep_device ? *ep_device : *device; }
  Communicator& ep_h() const { return ep_host ? *ep_host : *host; }
  int ep_size() const { return ep_h().size(); }
  int ep_rank() const { return ep_h().rank(); }
  int groups() const { return size() / ep_size(); }  // D
  int group() const { return rank() / ep_size(); }   // this rank's expert-parallel group
  // Expert state is written by the ranks of group 0 only (each expert once).
  bool writes_experts() const { return group() == 0; }
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

class Mesh;

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

  // The communicators of all ranks and of the mesh (plain W = 1 x W until set_mesh).
  Comms comms();
  // Collective: splits the ranks into W / n expert-parallel groups of n consecutive
  // ranks (dist/mesh.h). n must divide size(). Called once, after the config is read.
  // grad_comm: a communicator of its own for the overlapped dense-gradient reduction
  // (parallel.grad_reduce: overlap); without it Comms::grad() is the world's.
  void set_mesh(int expert_parallel, bool grad_comm = true);
  int ep_size() const;  // N: ranks per expert-parallel group (size() before set_mesh)

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
  std::unique_ptr<Mesh> mesh_;
  bool grad_comm_ = true;
};

// Runs body on every rank. A UserError on every rank (all reached the check) is
// printed once per rank and gives exit code 2 after a clean MPI_Finalize; any other
// exception aborts every rank with the failing rank's message. Returns the exit code.
int run_ranks(World& world, const std::function<int(World&)>& body);

}  // namespace moeprune
