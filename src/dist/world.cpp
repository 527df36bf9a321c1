#include "dist/world.h"

#include <ATen/Context.h>
#include <torch/cuda.h>
#include <ATen/Parallel.h>

#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include <string>

#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "dist/mesh.h"
#include "dist/node_memory.h"
#ifdef MOEPRUNE_WITH_CUDA
#include "dist/nccl_communicator.h"
#endif

namespace moeprune {

namespace {
// Large CPU tensors are allocated and freed every step (dispatch payloads,
// activations). glibc returns blocks above its mmap threshold to the kernel and
// trims the heap top eagerly, so each step page-faults its buffers in again
// (measured: dispatch + combine 1.6-2x slower). Keep freed blocks up to 32 MiB
// (glibc's largest mmap threshold) in the heap (runtime.malloc_tune).
void tune_host_allocator() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}
}  // namespace

// LibTorch gives CPU tensors of 2 MiB and more transparent huge pages (aligned
// blocks with madvise(MADV_HUGEPAGE)) when THP_MEM_ALLOC_ENABLE=1 is set before its
// first allocation, which it reads once. Tensors above glibc's largest mmap
// threshold (32 MiB: stacked expert gradients, their widening, activations of big
// layers) are mapped fresh each step and page-faulted in 4 KiB at a time; with huge
// pages 512x fewer faults (4096 x 768, E = 32, bf16 layer on a 2-core Xeon: 20-30% less
// time, docs/performance.md). Off with MOEPRUNE_MALLOC_TUNE=0 or THP_MEM_ALLOC_ENABLE=0.
static void enable_huge_pages() {
  if (env_value("MOEPRUNE_MALLOC_TUNE") != "0") setenv("THP_MEM_ALLOC_ENABLE", "1", /*overwrite=*/0);
}
World::World(int* argc, char*** argv, bool use_gpus) {
  enable_huge_pages();  // first: before any tensor is allocated
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  }
  // Errors come back as return codes so that they become exceptions with a message.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local_comm_);
  MPI_Comm_rank(local_comm_, &local_rank_);
  MPI_Comm_size(local_comm_, &local_size_);
  log::init(rank_, size_);
  mpi_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);

  if (use_gpus && torch::cuda::is_available()) {
    const int n = static_cast<int>(torch::cuda::device_count());
    // One rank per GPU: NCCL refuses two ranks of one communicator on one device
    // ("Duplicate GPU detected"), after a long wait on some versions. Every rank
    // learns whether any node is oversubscribed before NCCL starts, so all stop.
    const bool mine_ok = local_size_ <= n;
    if (!all_ok(mine_ok)) {
      const std::string why =
          mine_ok ? std::string("another node runs more ranks than it has GPUs")
                  : concat(local_size_, " ranks on this node but ", n, " visible GPU(s)");
      MPI_Comm_free(&local_comm_);
      mpi_.reset();
      MPI_Finalize();
      throw UserError(concat(why, ": moeprune runs one rank per GPU; start at most as many ranks per node as it has "
                                  "GPUs, or hide the GPUs with CUDA_VISIBLE_DEVICES= to run on CPUs"));
    }
    device_ = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank_ % n));
    // float32 means float32: PyTorch lets cuDNN's convolutions (the patch embedding)
    // round to TF32 by default, which made fp32 runs on GPUs drift from the CPU's.
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV,
                                            at::Float32Precision::IEEE);
#ifdef MOEPRUNE_WITH_CUDA
    device_comm_ = make_nccl_communicator(*mpi_, local_rank_ % n);
#else
    throw UserError("GPUs are visible but this moeprune was built without the CUDA path (MOEPRUNE_CUDA=OFF): "
                    "rebuild with -DMOEPRUNE_CUDA=ON, or hide the GPUs with CUDA_VISIBLE_DEVICES=");
#endif
  }
}

World::~World() {
  mesh_.reset();
  device_comm_.reset();
  if (local_comm_ != MPI_COMM_NULL) MPI_Comm_free(&local_comm_);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Comms World::comms() { return mesh_ ? mesh_->comms() : Comms{&comm(), mpi_.get()}; }

void World::set_mesh(int expert_parallel, bool grad_comm) {
  if (mesh_ && mesh_->expert_parallel() == expert_parallel && grad_comm_ == grad_comm) return;
  mesh_.reset();
  grad_comm_ = grad_comm;
  mesh_ = std::make_unique<Mesh>(*mpi_, comm(), expert_parallel, device_.is_cuda() ? device_.index() : -1,
                                 /*always_split=*/false, grad_comm);
  if (mesh_->groups() > 1)
    log::info(concat("mesh: ", size_, " ranks = ", mesh_->groups(), " expert-data-parallel groups x ", expert_parallel,
                     " expert-parallel ranks (this rank: group ", rank_ / expert_parallel, ", position ",
                     rank_ % expert_parallel, ")"));
}

int World::ep_size() const { return mesh_ ? mesh_->expert_parallel() : size_; }

bool World::all_ok(bool ok) {
  int mine = ok ? 0 : 1, any = 0;
  MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any == 0;
}

void World::agree(const std::function<void()>& fn) {
  std::string error;
  try {
    fn();
  } catch (const UserError& e) {
    error = e.what();
  }
  if (!all_ok(error.empty())) {
    // Every rank reports the message of the lowest rank that failed (a check only
    // rank 0 makes, such as the output directory's lock, is then said on every rank).
    int mine = error.empty() ? size_ : rank_, first = size_;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    int len = rank_ == first ? static_cast<int>(error.size()) : 0;
    MPI_Bcast(&len, 1, MPI_INT, first, MPI_COMM_WORLD);
    std::string shared(static_cast<size_t>(len), '\0');
    if (rank_ == first) shared = error;
    if (len > 0) MPI_Bcast(shared.data(), len, MPI_CHAR, first, MPI_COMM_WORLD);
    throw AgreedUserError(error.empty() ? shared : error);
  }
}

void World::abort(int code, const std::string& msg) {
  log::error(msg);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; this is for the type system
}

void World::apply_runtime(const RuntimeConfig& rt) {
  if (rt.malloc_tune) tune_host_allocator();
  set_node_memory_enabled(rt.node_memory);
  at::set_num_threads(resolve_threads(rt, local_size_));
  at::set_num_interop_threads(1);
}

std::vector<std::string> all_gather_strings(Communicator& host, const std::string& mine) {
  at::Tensor len = host.all_gather(at::tensor({static_cast<int64_t>(mine.size())}, at::kLong));
  const int64_t longest = len.max().item<int64_t>();
  at::Tensor buf = at::zeros({longest}, at::kByte);
  std::memcpy(buf.data_ptr<uint8_t>(), mine.data(), mine.size());
  at::Tensor all = host.all_gather(buf);
  std::vector<std::string> out;
  for (int r = 0; r < host.size(); ++r)
    out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr<uint8_t>()),
                     static_cast<size_t>(len[r][0].item<int64_t>()));
  return out;
}

void agree_on_error(Communicator& host, const std::string& error, const std::string& what, const std::string& suffix) {
  const std::vector<std::string> all = all_gather_strings(host, error);
  for (size_t r = 0; r < all.size(); ++r)
    if (!all[r].empty())
      throw AgreedUserError(
          concat(what, all.size() > 1 ? concat(" (rank ", r, ")") : std::string(), ": ", all[r], suffix));
}

int run_ranks(World& world, const std::function<int(World&)>& body) {
  try {
    return body(world);
  } catch (const AgreedUserError& e) {
    log::error(e.what()[0] ? std::string(e.what()) : std::string("another rank rejected the input"));
    return kExitUserError;
  } catch (const UserError& e) {
    // Every rank that validates the same replicated input reaches this point; ranks
    // that did not fail are blocked in a collective, so abort rather than wait.
    log::error(e.what());
    if (world.size() > 1) {
      MPI_Abort(MPI_COMM_WORLD, kExitUserError);
    }
    return kExitUserError;
  } catch (const DivergedError& e) {
    // Every rank holds the same gradient norm, so every rank is here: no collective pending.
    log::error(e.what());
    return kExitDiverged;
  } catch (const std::exception& e) {
    world.abort(kExitInternal, concat("fatal: ", e.what()));
  }
}

}  // namespace moeprune
