// NCCL backend for CUDA tensors (built when MOEPRUNE_WITH_CUDA). Collectives run
// on the current CUDA stream of the tensor's device; all-to-all-v is a group of
// ncclSend/ncclRecv. Host-side count exchange goes over the MPI communicator the
// NCCL communicator was bootstrapped from (the unique id is broadcast over MPI).
#pragma once
#include "dist/communicator.h"

namespace moeprune {

// Returns an NCCL communicator over the ranks of `mpi` using CUDA device
// `device_index`. Throws when the build has no CUDA path.
std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& mpi, int device_index);

}  // namespace moeprune
