#include "dist/mesh.h"

#include "core/error.h"
#ifdef MOEPRUNE_WITH_CUDA
#include "dist/nccl_communicator.h"
#endif

namespace moeprune {

Mesh::Mesh(MpiCommunicator& world_host, Communicator& world_device, int expert_parallel, int cuda_device,
           bool always_split, bool grad_comm)
    : world_host_(&world_host), world_device_(&world_device), n_(expert_parallel) {
  const int W = world_host.size(), r = world_host.rank();
  require(n_ >= 1 && W % n_ == 0, concat("mesh: expert-parallel size ", n_, " does not divide the world size ", W));
  d_ = W / n_;
  if (W > 1 && grad_comm) {
    MPI_Comm_dup(world_host.handle(), &grad_);
    MPI_Comm_set_errhandler(grad_, MPI_ERRORS_RETURN);
    grad_host_ = std::make_unique<MpiCommunicator>(grad_);
    if (cuda_device >= 0) {
#ifdef MOEPRUNE_WITH_CUDA
      grad_device_ = make_nccl_communicator(*grad_host_, cuda_device);
#endif
    }
  }
  if (d_ == 1 && !always_split) return;  // one group: the world itself, no replicas
  MPI_Comm_split(world_host.handle(), r / n_, r % n_, &ep_);
  MPI_Comm_split(world_host.handle(), r % n_, r / n_, &edp_);
  MPI_Comm_set_errhandler(ep_, MPI_ERRORS_RETURN);
  MPI_Comm_set_errhandler(edp_, MPI_ERRORS_RETURN);
  ep_host_ = std::make_unique<MpiCommunicator>(ep_);
  edp_host_ = std::make_unique<MpiCommunicator>(edp_);
  if (cuda_device >= 0) {
#ifdef MOEPRUNE_WITH_CUDA
    // One NCCL communicator per group, bootstrapped over the group's MPI communicator
    // (ncclCommInitRank with the group's unique id): created once, here.
    ep_device_ = make_nccl_communicator(*ep_host_, cuda_device);
    edp_device_ = make_nccl_communicator(*edp_host_, cuda_device);
#else
    throw std::logic_error("mesh: a CUDA device without the CUDA path");
#endif
  }
}

Mesh::~Mesh() {
  ep_device_.reset();
  edp_device_.reset();
  grad_device_.reset();
  ep_host_.reset();
  edp_host_.reset();
  grad_host_.reset();
  if (ep_ != MPI_COMM_NULL) MPI_Comm_free(&ep_);
  if (edp_ != MPI_COMM_NULL) MPI_Comm_free(&edp_);
  if (grad_ != MPI_COMM_NULL) MPI_Comm_free(&grad_);
}

Comms Mesh::comms() const {
  Comms c{world_device_, world_host_};
  if (grad_host_) c.grad_device = grad_device_ ? grad_device_.get() : grad_host_.get();
  if (!ep_host_) return c;
  c.ep_host = ep_host_.get();
  c.edp_host = edp_host_.get();
  c.ep_device = ep_device_ ? ep_device_.get() : ep_host_.get();
  c.edp_device = edp_device_ ? edp_device_.get() : edp_host_.get();
  return c;
}

}  // namespace moeprune
