// The process mesh of expert-data parallelism: W = D x N ranks, grouped into D
// expert-parallel groups of N consecutive ranks (consecutive, so that a group sits
// inside a node, where the all-to-all is fastest). The ranks of a group hold one
// copy of every expert between them (placement over N positions) and exchange
// tokens among themselves; the ranks at the same position of every group form an
// expert-data-parallel group: they hold the same experts and average those
// experts' gradients. Dense weights are replicated on all W ranks.
//
//   world rank  r = g * N + p     (group g in 0..D-1, position p in 0..N-1)
//   ep group    {g*N .. g*N+N-1}  dispatch/combine, expert-gradient norm
//   edp group   {p, N+p, ...}     expert-gradient averaging
//
// Group 0 holds ranks 0..N-1, so a rank's position in group 0 is its world rank:
// checkpoints and model files take every expert from group 0 (each once).
#pragma once
#include <mpi.h>

#include <memory>

#include "dist/world.h"

namespace moeprune {

class Mesh {
 public:
  // Collective over `world_host`. n must divide its size. cuda_device >= 0: the
  // device communicators are NCCL communicators on that device (CUDA builds),
  // else the MPI ones. With one group (D = 1) the world's communicators serve
  // unless always_split (tests: the sub-communicator path on one rank). With more
  // than one rank and grad_comm (parallel.grad_reduce: overlap), the dense-gradient
  // reduction gets its own world communicator (MPI_Comm_dup; on GPUs its own NCCL
  // communicator), so that its buckets never interleave with the layers' exchanges.
  Mesh(MpiCommunicator& world_host, Communicator& world_device, int expert_parallel, int cuda_device = -1,
       bool always_split = false, bool grad_comm = true);
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  int expert_parallel() const { return n_; }  // N
  int groups() const { return d_; }           // D
  Comms comms() const;

 private:
  MpiCommunicator* world_host_;
  Communicator* world_device_;
  int n_ = 1, d_ = 1;
  MPI_Comm ep_ = MPI_COMM_NULL, edp_ = MPI_COMM_NULL, grad_ = MPI_COMM_NULL;
  std::unique_ptr<MpiCommunicator> ep_host_, edp_host_, grad_host_;
  std::unique_ptr<Communicator> ep_device_, edp_device_, grad_device_;
};

}  // namespace moeprune
