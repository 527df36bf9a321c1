#include "ckpt/vmoe_format.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <msgpack.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/strings.h"

namespace moeprune {
namespace {

// vmoe/checkpoints/serialization.py _MsgpackExtType.
constexpr int8_t kExtNdarray = 1;
constexpr int8_t kExtSliceNd = 6;
constexpr int8_t kExtIndexInfo = 8;
constexpr const char* kChunkMarker = "__msgpack_array_chunk_a87ca2__";
constexpr const char* kVersionV1 = "20220622";

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeInfo kDtypes[] = {{"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf},
                                 {"float64", at::kDouble}};

const DtypeInfo* dtype_named(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

// A file mapped read-only for the lifetime of the object.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    std::error_code ec;
    require(std::filesystem::exists(path, ec), concat("vmoe checkpoint: '", path, "' is missing"));
    require(std::filesystem::is_regular_file(path, ec), concat("vmoe checkpoint: '", path, "' is not a regular file"));
    fd_ = ::open(path.c_str(), O_RDONLY);
    require(fd_ >= 0, concat("vmoe checkpoint: cannot open '", path, "': ", std::strerror(errno)));
    struct stat st{};
    ::fstat(fd_, &st);
    size_ = static_cast<size_t>(st.st_size);
    require(size_ > 0, concat("vmoe checkpoint: '", path, "' is empty"));
    void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (m == MAP_FAILED) {
      ::close(fd_);
      throw UserError(concat("vmoe checkpoint: cannot map '", path, "': ", std::strerror(errno)));
    }
    data_ = static_cast<const char*>(m);
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

// Strings, bins and ext payloads point into the mapped file: nothing is copied.
bool reference_all(msgpack::type::object_type, std::size_t, void*) { return true; }

// One msgpack object spanning exactly [data, data+size). `what` names it in errors.
msgpack::object_handle unpack_exact(const char* data, size_t size, const std::string& what) {
  size_t off = 0;
  msgpack::object_handle oh;
  try {
    oh = msgpack::unpack(data, size, off, reference_all);
  } catch (const msgpack::insufficient_bytes&) {
    throw UserError(concat(what, " is truncated (msgpack data ends early)"));
  } catch (const std::exception& e) {
    throw UserError(concat(what, " is not valid msgpack (", e.what(), ")"));
  }
  require(off == size, concat(what, " has ", size - off, " trailing bytes after its msgpack object"));
  return oh;
}

std::string type_name(const msgpack::object& o) {
  switch (o.type) {
    case msgpack::type::NIL: return "nil";
    case msgpack::type::BOOLEAN: return "bool";
    case msgpack::type::POSITIVE_INTEGER:
    case msgpack::type::NEGATIVE_INTEGER: return "integer";
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: return "float";
    case msgpack::type::STR: return "string";
    case msgpack::type::BIN: return "bin";
    case msgpack::type::ARRAY: return "array";
    case msgpack::type::MAP: return "map";
    case msgpack::type::EXT: return concat("extension type ", static_cast<int>(o.via.ext.type()));
  }
  return "unknown";
}

// Typed access with one message shape: "<where>: expected <what>, found <type>".
class Reader {
 public:
  explicit Reader(std::string where) : where_(std::move(where)) {}
  [[noreturn]] void fail(const std::string& what) const { throw UserError(concat(where_, ": ", what)); }
  void expect(const msgpack::object& o, msgpack::type::object_type t, const char* what) const {
    if (o.type != t) fail(concat("expected ", what, ", found ", type_name(o)));
  }
  const msgpack::object_array& array(const msgpack::object& o, int64_t n = -1) const {
    expect(o, msgpack::type::ARRAY, "an array");
    if (n >= 0 && o.via.array.size != static_cast<uint32_t>(n))
      fail(concat("expected an array of ", n, ", found one of ", o.via.array.size));
    return o.via.array;
  }
  int64_t integer(const msgpack::object& o) const {
    if (o.type == msgpack::type::POSITIVE_INTEGER) {
      if (o.via.u64 > static_cast<uint64_t>(INT64_MAX)) fail("integer out of range");
      return static_cast<int64_t>(o.via.u64);
    }
    if (o.type == msgpack::type::NEGATIVE_INTEGER) return o.via.i64;
    fail(concat("expected an integer, found ", type_name(o)));
  }
  std::string str(const msgpack::object& o) const {
    expect(o, msgpack::type::STR, "a string");
    return std::string(o.via.str.ptr, o.via.str.size);
  }
  std::pair<const char*, size_t> bin(const msgpack::object& o) const {
    expect(o, msgpack::type::BIN, "bin");
    return {o.via.bin.ptr, o.via.bin.size};
  }
  std::pair<const char*, size_t> ext(const msgpack::object& o, int8_t code, const char* what) const {
    if (o.type != msgpack::type::EXT || o.via.ext.type() != code)
      fail(concat("expected ", what, " (msgpack extension type ", static_cast<int>(code), "), found ", type_name(o)));
    return {o.via.ext.data(), o.via.ext.size};
  }
  // A nested msgpack object packed into bytes (vmoe packs ext payloads and slices so).
  msgpack::object_handle nested(std::pair<const char*, size_t> bytes) const {
    return unpack_exact(bytes.first, bytes.second, where_);
  }
  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

// SliceNd payload: array of bins, each msgpack [start, stop, step(nil)].
VmoeSlice parse_slice(const Reader& r, std::pair<const char*, size_t> payload) {
  VmoeSlice s;
  auto oh = r.nested(payload);
  const auto& axes = r.array(oh.get());
  for (uint32_t i = 0; i < axes.size; ++i) {
    const msgpack::object& axis = axes.ptr[i];
    auto a = r.nested(r.bin(axis));
    const auto& v = r.array(a.get(), 3);
    if (v.ptr[2].type != msgpack::type::NIL && !(v.ptr[2].type == msgpack::type::POSITIVE_INTEGER && v.ptr[2].via.u64 == 1))
      r.fail("slice with a step other than 1");
    s.start.push_back(r.integer(v.ptr[0]));
    s.stop.push_back(r.integer(v.ptr[1]));
  }
  return s;
}

bool slice_inside(const VmoeSlice& s, const std::vector<int64_t>& shape) {
  if (s.start.size() != shape.size()) return false;
  for (size_t d = 0; d < shape.size(); ++d)
    if (s.start[d] < 0 || s.start[d] >= s.stop[d] || s.stop[d] > shape[d]) return false;
  return true;
}

bool overlap(const VmoeSlice& a, const VmoeSlice& b) {
  for (size_t d = 0; d < a.start.size(); ++d)
    if (a.stop[d] <= b.start[d] || b.stop[d] <= a.start[d]) return false;
  return true;
}


// Walks the index tree depth first with keys in sorted order: JAX's leaf order.
void collect_leaves(const Reader& r, const msgpack::object& node, std::vector<std::string>& path,
                    std::vector<VmoeLeaf>& out, int shard_count) {
  if (node.type == msgpack::type::MAP) {
    std::map<std::string, const msgpack::object*> sorted;
    for (uint32_t i = 0; i < node.via.map.size; ++i) {
      const auto& kv = node.via.map.ptr[i];
      const std::string key = Reader(concat(r.where(), ": index key under '", join(path, "/"), "'")).str(kv.key);
      require(sorted.emplace(key, &kv.val).second,
              concat(r.where(), ": key '", key, "' appears twice under '", join(path, "/"), "'"));
    }
    for (const auto& [key, val] : sorted) {
      path.push_back(key);
      collect_leaves(r, *val, path, out, shard_count);
      path.pop_back();
    }
    return;
  }
  const std::string p = join(path, "/");
  const Reader lr(concat(r.where(), ": leaf '", p, "'"));
  auto payload = lr.nested(lr.ext(node, kExtIndexInfo, "an IndexInfo"));
  const auto& info = lr.array(payload.get(), 3);
  VmoeLeaf leaf;
  leaf.id = static_cast<int>(out.size());
  leaf.path = p;
  {
    auto sa = lr.nested(lr.bin(info.ptr[0]));
    const auto& v = lr.array(sa.get());
    if (v.size < 2) lr.fail("shaped array with fewer than 2 fields");
    for (uint32_t i = 0; i < lr.array(v.ptr[0]).size; ++i) {
      const int64_t n = lr.integer(v.ptr[0].via.array.ptr[i]);
      if (n < 0) lr.fail(concat("negative extent ", n));
      leaf.shape.push_back(n);
    }
    leaf.dtype = lr.str(v.ptr[1]);
    if (!dtype_named(leaf.dtype)) lr.fail(concat("dtype '", leaf.dtype, "' is not supported (float32, bfloat16, float16, float64)"));
  }
  const auto& slices = lr.array(info.ptr[1]);
  const auto& shards = lr.array(info.ptr[2], slices.size);
  for (uint32_t i = 0; i < slices.size; ++i) {
    VmoeSlice s = parse_slice(lr, lr.bin(slices.ptr[i]));
    if (!slice_inside(s, leaf.shape)) lr.fail(concat("slice ", s.str(), " lies outside the shape ", leaf.shape_str()));
    const int64_t shard = lr.integer(shards.ptr[i]);
    if (shard < 0 || shard >= shard_count)
      lr.fail(concat("chunk ", s.str(), " is in data file ", shard, ", the index has ", shard_count));
    for (const auto& other : leaf.slices)
      if (overlap(other, s)) lr.fail(concat("slices ", other.str(), " and ", s.str(), " overlap"));
    leaf.slices.push_back(std::move(s));
    leaf.shards.push_back(static_cast<int>(shard));
  }
  int64_t covered = 0;
  for (const auto& s : leaf.slices) covered += s.volume();
  if (covered != leaf.numel())
    lr.fail(concat("its slices cover ", covered, " of ", leaf.numel(), " elements"));
  out.push_back(std::move(leaf));
}

// What a read needs of one leaf, and where the output goes.
struct Target {
  const VmoeLeaf* leaf = nullptr;
  const VmoeCheckpoint::Request* req = nullptr;
  at::Tensor out;
  int64_t covered = 0;
  std::vector<int64_t> row_slot;  // rows mode: output row of each input row (-1 = not requested)
  // Chunks (index into leaf->slices) that intersect the request and were not seen yet.
  std::set<int> pending;
};

bool intersects(const VmoeSlice& s, const Target& t) {
  if (t.req->rows.empty() || s.start.empty()) return true;
  for (int64_t r = s.start[0]; r < s.stop[0]; ++r)
    if (t.row_slot[static_cast<size_t>(r)] >= 0) return true;
  return false;
}

// Copies the chunk `src` (the global slice s of the leaf) into the target.
void copy_chunk(Target& t, const VmoeSlice& s, const at::Tensor& src) {
  const at::Tensor chunk = src.to(at::kFloat);
  if (t.req->rows.empty()) {
    at::Tensor dst = t.out;
    for (size_t d = 0; d < s.start.size(); ++d)
      dst = dst.narrow(static_cast<int64_t>(d), s.start[d], s.stop[d] - s.start[d]);
    dst.copy_(chunk);
    t.covered += chunk.numel();
    return;
  }
  for (int64_t r = s.start[0]; r < s.stop[0]; ++r) {
    const int64_t slot = t.row_slot[static_cast<size_t>(r)];
    if (slot < 0) continue;
    at::Tensor dst = t.out.select(0, slot);
    for (size_t d = 1; d < s.start.size(); ++d)
      dst = dst.narrow(static_cast<int64_t>(d - 1), s.start[d], s.stop[d] - s.start[d]);
    const at::Tensor row = chunk.select(0, r - s.start[0]);
    dst.copy_(row);
    t.covered += row.numel();
  }
}

}  // namespace

int64_t VmoeSlice::volume() const {
  int64_t v = 1;
  for (size_t d = 0; d < start.size(); ++d) v *= stop[d] - start[d];
  return v;
}

std::string VmoeSlice::str() const {
  std::ostringstream o;
  o << "[";
  for (size_t d = 0; d < start.size(); ++d) o << (d ? ", " : "") << start[d] << ":" << stop[d];
  o << "]";
  return o.str();
}

int64_t VmoeLeaf::numel() const {
  int64_t n = 1;
  for (int64_t e : shape) n *= e;
  return n;
}

std::string VmoeLeaf::shape_str() const {
  std::ostringstream o;
  o << "(";
  for (size_t d = 0; d < shape.size(); ++d) o << (d ? ", " : "") << shape[d];
  o << (shape.size() == 1 ? ",)" : ")");
  return o.str();
}

bool VmoeCheckpoint::is_prefix(const std::string& path) {
  std::error_code ec;
  return !path.empty() && std::filesystem::exists(path + ".index", ec);
}

VmoeCheckpoint::VmoeCheckpoint(const std::string& prefix) : prefix_(prefix) {
  std::error_code ec;
  if (std::filesystem::is_directory(prefix, ec) && !is_prefix(prefix)) {
    // A directory: name the prefixes inside, if any.
    std::vector<std::string> found;
    for (const auto& e : std::filesystem::directory_iterator(prefix, ec))
      if (e.path().extension() == ".index") found.push_back(e.path().stem().string());
    std::sort(found.begin(), found.end());
    throw UserError(concat("vmoe checkpoint: '", prefix, "' is a directory; give the checkpoint prefix",
                           found.empty() ? std::string(" (the path before .index)")
                                         : concat(", e.g. '", (std::filesystem::path(prefix) / found[0]).string(), "'")));
  }
  if (std::filesystem::exists(std::filesystem::path(prefix) / "manifest.ocdbt", ec) ||
      std::filesystem::exists(std::filesystem::path(prefix) / "state" / "manifest.ocdbt", ec))
    throw UserError(concat("vmoe checkpoint: '", prefix, "' is an Orbax checkpoint (vmoe's newer trainer); this reader ",
                           "reads the released .index/.data format"));
  const MappedFile f(index_path());
  const Reader r(concat("vmoe index '", f.path(), "'"));
  auto oh = unpack_exact(f.data(), f.size(), r.where());
  const msgpack::object& top = oh.get();
  r.expect(top, msgpack::type::MAP, "a map with shard_count, index and version");
  const msgpack::object* index = nullptr;
  bool have_count = false;
  for (uint32_t i = 0; i < top.via.map.size; ++i) {
    const auto& kv = top.via.map.ptr[i];
    const std::string key = r.str(kv.key);
    if (key == "shard_count") {
      const int64_t n = Reader(r.where() + ": shard_count").integer(kv.val);
      require(n >= 1 && n <= 100000, concat(r.where(), ": shard_count ", n, " is not in [1, 100000]"));
      shard_count_ = static_cast<int>(n);
      have_count = true;
    } else if (key == "index") {
      index = &kv.val;
    } else if (key == "version") {
      version_ = Reader(r.where() + ": version").str(kv.val);
    }
  }
  require(have_count && index, concat(r.where(), ": not a vmoe checkpoint index (no shard_count or index)"));
  require(version_.empty() || version_ == kVersionV1,
          concat(r.where(), ": version '", version_, "' is not supported (this reader knows '", kVersionV1,
                 "' and indexes without a version)"));
  r.expect(*index, msgpack::type::MAP, "a map under 'index'");
  std::vector<std::string> path;
  collect_leaves(r, *index, path, leaves_, shard_count_);
  require(!leaves_.empty(), concat(r.where(), ": the index holds no arrays"));
  for (const auto& l : leaves_) by_path_[l.path] = l.id;
}

std::string VmoeCheckpoint::shard_path(int shard) const {
  char suffix[64];
  std::snprintf(suffix, sizeof suffix, ".data-%05d-of-%05d", shard, shard_count_);
  return prefix_ + suffix;
}

const VmoeLeaf* VmoeCheckpoint::find(const std::string& path) const {
  const auto it = by_path_.find(path);
  return it == by_path_.end() ? nullptr : &leaves_[static_cast<size_t>(it->second)];
}

int64_t VmoeCheckpoint::num_parameters() const {
  int64_t n = 0;
  for (const auto& l : leaves_) n += l.numel();
  return n;
}

std::map<std::string, at::Tensor> VmoeCheckpoint::read(const std::vector<Request>& requests) const {
  std::map<int, Target> targets;  // by leaf id
  std::set<int> files;
  for (const Request& req : requests) {
    const VmoeLeaf* leaf = find(req.path);
    require(leaf, concat("vmoe checkpoint '", prefix_, "' has no array '", req.path, "'"));
    Target t;
    t.leaf = leaf;
    t.req = &req;
    std::vector<int64_t> shape = leaf->shape;
    if (!req.rows.empty()) {
      require(!shape.empty(), concat("vmoe checkpoint: '", req.path, "' is a scalar; rows cannot be read"));
      t.row_slot.assign(static_cast<size_t>(shape[0]), -1);
      for (size_t i = 0; i < req.rows.size(); ++i) {
        const int64_t row = req.rows[i];
        require(row >= 0 && row < shape[0], concat("vmoe checkpoint '", prefix_, "': '", req.path, "' has ", shape[0],
                                                   " rows along its first axis, row ", row, " was asked for"));
        t.row_slot[static_cast<size_t>(row)] = static_cast<int64_t>(i);
      }
      shape[0] = static_cast<int64_t>(req.rows.size());
    }
    t.out = at::zeros(shape, at::kFloat);
    for (size_t c = 0; c < leaf->slices.size(); ++c)
      if (intersects(leaf->slices[c], t)) {
        t.pending.insert(static_cast<int>(c));
        files.insert(leaf->shards[c]);
      }
    require(targets.emplace(leaf->id, std::move(t)).second,
            concat("vmoe checkpoint: '", req.path, "' was requested twice"));
  }

  for (int shard : files) {
    const MappedFile f(shard_path(shard));
    const Reader r(concat("vmoe data file '", f.path(), "'"));
    auto oh = unpack_exact(f.data(), f.size(), r.where());
    const msgpack::object& top = oh.get();
    r.expect(top, msgpack::type::MAP, "a map of array chunks");
    bool marker = false;
    for (uint32_t i = 0; i < top.via.map.size; ++i) {
      const auto& kv = top.via.map.ptr[i];
      const std::string key = r.str(kv.key);
      if (key == kChunkMarker) {
        marker = kv.val.type == msgpack::type::BOOLEAN && kv.val.via.boolean;
        continue;
      }
      int64_t id = -1;
      if (!key.empty() && key.size() < 10 && std::all_of(key.begin(), key.end(), ::isdigit)) id = std::stoll(key);
      if (id < 0 || id >= static_cast<int64_t>(leaves_.size()))
        r.fail(concat("key '", key, "' is not a leaf id of the index (0..", leaves_.size() - 1, ")"));
      const auto it = targets.find(static_cast<int>(id));
      if (it == targets.end()) continue;  // not needed here: not touched
      Target& t = it->second;
      const VmoeLeaf& leaf = *t.leaf;
      const Reader lr(concat(r.where(), ": leaf ", id, " '", leaf.path, "'"));
      const auto& chunks = lr.array(kv.val);
      const at::ScalarType st = dtype_named(leaf.dtype)->type;
      const int64_t item = static_cast<int64_t>(c10::elementSize(st));
      for (uint32_t c = 0; c < chunks.size; ++c) {
        const auto& pair = lr.array(chunks.ptr[c], 2);
        const VmoeSlice s = parse_slice(lr, lr.ext(pair.ptr[1], kExtSliceNd, "a SliceNd"));
        int which = -1;
        for (size_t k = 0; k < leaf.slices.size(); ++k)
          if (leaf.slices[k].start == s.start && leaf.slices[k].stop == s.stop) which = static_cast<int>(k);
        if (which < 0 || leaf.shards[static_cast<size_t>(which)] != shard)
          lr.fail(concat("holds chunk ", s.str(), ", which the index does not place in this file"));
        if (!t.pending.count(which)) continue;
        t.pending.erase(which);
        // Sub-chunks: 1-D ndarrays (ext 1: [shape, dtype, raw bytes]), concatenated.
        const auto& subs = lr.array(pair.ptr[0]);
        std::vector<std::pair<const char*, size_t>> parts;
        int64_t bytes = 0;
        for (uint32_t k = 0; k < subs.size; ++k) {
          auto nd = lr.nested(lr.ext(subs.ptr[k], kExtNdarray, "an ndarray"));
          const auto& v = lr.array(nd.get(), 3);
          const std::string dt = lr.str(v.ptr[1]);
          if (dt != leaf.dtype) lr.fail(concat("chunk ", s.str(), " is ", dt, ", the index says ", leaf.dtype));
          int64_t n = 1;
          for (uint32_t d = 0; d < lr.array(v.ptr[0]).size; ++d) n *= lr.integer(v.ptr[0].via.array.ptr[d]);
          const auto raw = lr.bin(v.ptr[2]);
          if (static_cast<int64_t>(raw.second) != n * item)
            lr.fail(concat("sub-chunk of ", n, " elements has ", raw.second, " bytes"));
          parts.push_back(raw);
          bytes += static_cast<int64_t>(raw.second);
        }
        if (bytes != s.volume() * item)
          lr.fail(concat("chunk ", s.str(), " has ", bytes, " bytes, its slice needs ", s.volume() * item));
        at::Tensor buf = at::empty({s.volume()}, at::TensorOptions().dtype(st));
        char* dst = static_cast<char*>(buf.data_ptr());
        for (const auto& p : parts) {
          std::memcpy(dst, p.first, p.second);
          dst += p.second;
        }
        std::vector<int64_t> ext;
        for (size_t d = 0; d < s.start.size(); ++d) ext.push_back(s.stop[d] - s.start[d]);
        copy_chunk(t, s, buf.view(ext));
      }
    }
    require(marker, concat(r.where(), ": not a vmoe data file (no '", kChunkMarker, "' marker)"));
    for (auto& [id, t] : targets)
      for (int c : t.pending)
        require(t.leaf->shards[static_cast<size_t>(c)] != shard,
                concat(r.where(), ": lacks chunk ", t.leaf->slices[static_cast<size_t>(c)].str(), " of '", t.leaf->path,
                       "', which the index places there"));
    // The pages of this file are not needed again: let the kernel drop them.
    ::madvise(const_cast<char*>(f.data()), f.size(), MADV_DONTNEED);
  }

  std::map<std::string, at::Tensor> out;
  for (auto& [id, t] : targets) {
    require(t.covered == t.out.numel(), concat("vmoe checkpoint '", prefix_, "': '", t.leaf->path, "': read ", t.covered,
                                               " of ", t.out.numel(), " requested elements"));
    require(at::isfinite(t.out).all().item<bool>(),
            concat("vmoe checkpoint '", prefix_, "': '", t.leaf->path, "' holds non-finite values (corrupt data file?)"));
    out.emplace(t.leaf->path, std::move(t.out));
  }
  return out;
}

std::string describe_vmoe(const VmoeCheckpoint& ck) {
  std::ostringstream o;
  o << "vmoe checkpoint " << ck.prefix() << ": version " << (ck.version().empty() ? "none" : ck.version()) << ", "
    << ck.leaves().size() << " arrays, " << ck.num_parameters() << " parameters, " << ck.shard_count()
    << " data file(s)\n";
  int missing = 0;
  for (int s = 0; s < ck.shard_count(); ++s) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(ck.shard_path(s), ec);
    missing += ec ? 1 : 0;
    o << "  " << ck.shard_path(s) << (ec ? "  MISSING" : concat("  ", size, " bytes")) << "\n";
  }
  std::map<std::string, int> dtypes;
  for (const auto& l : ck.leaves()) {
    ++dtypes[l.dtype];
    char line[512];
    std::snprintf(line, sizeof line, "  %4d %-58s %-16s %-8s %zu chunk(s) in file(s) %s\n", l.id, l.path.c_str(),
                  l.shape_str().c_str(), l.dtype.c_str(), l.slices.size(), join(l.shards, ",").c_str());
    o << line;
  }
  o << "dtypes:";
  for (const auto& [k, n] : dtypes) o << " " << n << " " << k;
  o << (missing ? concat("\n", missing, " data file(s) missing") : std::string()) << "\n";
  return o.str();
}

namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void pack_bytes_as_bin(Packer& pk, const msgpack::sbuffer& b) {
  pk.pack_bin(static_cast<uint32_t>(b.size()));
  pk.pack_bin_body(b.data(), static_cast<uint32_t>(b.size()));
}

void pack_ext(Packer& pk, int8_t code, const msgpack::sbuffer& payload) {
  pk.pack_ext(payload.size(), code);
  pk.pack_ext_body(payload.data(), static_cast<uint32_t>(payload.size()));
}

void pack_str(Packer& pk, const std::string& s) {
  pk.pack_str(static_cast<uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

// SliceNd payload: an array of bins, each msgpack [start, stop, nil].
msgpack::sbuffer slice_payload(const VmoeSlice& s) {
  msgpack::sbuffer out;
  Packer pk(out);
  pk.pack_array(static_cast<uint32_t>(s.start.size()));
  for (size_t d = 0; d < s.start.size(); ++d) {
    msgpack::sbuffer axis;
    Packer pa(axis);
    pa.pack_array(3);
    pa.pack(s.start[d]);
    pa.pack(s.stop[d]);
    pa.pack_nil();
    pack_bytes_as_bin(pk, axis);
  }
  return out;
}

struct WriteLeaf {
  VmoeLeaf leaf;
  at::Tensor value;  // contiguous CPU, in the leaf's dtype
};

// Nested map of the index tree (std::map: keys sorted as JAX flattens them).
struct IndexNode {
  std::map<std::string, IndexNode> children;
  const WriteLeaf* leaf = nullptr;
};

void pack_index(Packer& pk, const IndexNode& node) {
  if (node.leaf) {
    const VmoeLeaf& l = node.leaf->leaf;
    msgpack::sbuffer shaped;
    Packer ps(shaped);
    ps.pack_array(4);
    ps.pack_array(static_cast<uint32_t>(l.shape.size()));
    for (int64_t e : l.shape) ps.pack(e);
    pack_str(ps, l.dtype);
    ps.pack_false();
    ps.pack_map(0);
    msgpack::sbuffer info;
    Packer pi(info);
    pi.pack_array(3);
    pack_bytes_as_bin(pi, shaped);
    pi.pack_array(static_cast<uint32_t>(l.slices.size()));
    for (const auto& s : l.slices) pack_bytes_as_bin(pi, slice_payload(s));
    pi.pack_array(static_cast<uint32_t>(l.shards.size()));
    for (int sh : l.shards) pi.pack(sh);
    pack_ext(pk, kExtIndexInfo, info);
    return;
  }
  pk.pack_map(static_cast<uint32_t>(node.children.size()));
  for (const auto& [key, child] : node.children) {
    pack_str(pk, key);
    pack_index(pk, child);
  }
}

void write_file(const std::string& path, const msgpack::sbuffer& b) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(b.data(), static_cast<std::streamsize>(b.size()));
    f.flush();
    if (!f) throw std::runtime_error(concat("writing '", tmp, "' failed: ", std::strerror(errno)));
  }
  const int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace

void write_vmoe_checkpoint(const std::string& prefix, const std::map<std::string, at::Tensor>& params, int num_shards,
                           int expert_chunks) {
  require(num_shards >= 1, "vmoe export: at least one data file");
  require(expert_chunks >= 1, "vmoe export: at least one chunk per expert tensor");
  IndexNode root;
  std::vector<WriteLeaf> leaves;
  leaves.reserve(params.size());
  // std::map order = sorted "/"-joined paths; JAX's order sorts per level, which
  // differs when one key is a prefix of another ("a/b" vs "a_c/..."): sort by the
  // path's components instead.
  std::vector<std::pair<std::vector<std::string>, const std::pair<const std::string, at::Tensor>*>> order;
  for (const auto& item : params) {
    std::vector<std::string> parts;
    std::stringstream ss(item.first);
    for (std::string part; std::getline(ss, part, '/');) parts.push_back(part);
    order.emplace_back(parts, &item);
  }
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [parts, item] : order) {
    WriteLeaf w;
    w.value = item->second.detach().to(at::kCPU).contiguous();
    const at::ScalarType st = w.value.scalar_type();
    const DtypeInfo* dt = nullptr;
    for (const auto& d : kDtypes)
      if (d.type == st) dt = &d;
    require(dt, concat("vmoe export: '", item->first, "' has dtype ", c10::toString(st)));
    w.leaf.id = static_cast<int>(leaves.size());
    w.leaf.path = item->first;
    w.leaf.dtype = dt->name;
    w.leaf.shape.assign(w.value.sizes().begin(), w.value.sizes().end());
    const bool experts = item->first.find("/Moe/Mlp/") != std::string::npos && !w.leaf.shape.empty();
    const int64_t n_chunks = experts ? std::min<int64_t>(expert_chunks, w.leaf.shape[0]) : 1;
    require(!experts || w.leaf.shape[0] % n_chunks == 0,
            concat("vmoe export: ", w.leaf.shape[0], " experts do not split into ", n_chunks, " chunks"));
    for (int64_t c = 0; c < n_chunks; ++c) {
      VmoeSlice s;
      for (size_t d = 0; d < w.leaf.shape.size(); ++d) {
        s.start.push_back(0);
        s.stop.push_back(w.leaf.shape[d]);
      }
      if (experts) {
        const int64_t rows = w.leaf.shape[0] / n_chunks;
        s.start[0] = c * rows;
        s.stop[0] = (c + 1) * rows;
      }
      w.leaf.slices.push_back(s);
    }
    leaves.push_back(std::move(w));
  }
  // Chunks to files: the file with the fewest bytes so far, ties to the lowest number.
  std::vector<int64_t> file_bytes(static_cast<size_t>(num_shards), 0);
  for (auto& w : leaves)
    for (const auto& s : w.leaf.slices) {
      const auto it = std::min_element(file_bytes.begin(), file_bytes.end());
      w.leaf.shards.push_back(static_cast<int>(it - file_bytes.begin()));
      *it += s.volume() * static_cast<int64_t>(w.value.element_size());
    }
  for (const auto& w : leaves) {
    IndexNode* node = &root;
    std::stringstream ss(w.leaf.path);
    for (std::string part; std::getline(ss, part, '/');) node = &node->children[part];
    require(!node->leaf && node->children.empty(), concat("vmoe export: '", w.leaf.path, "' is both a leaf and a subtree"));
    node->leaf = &w;
  }
  for (int shard = 0; shard < num_shards; ++shard) {
    msgpack::sbuffer b;
    Packer pk(b);
    int64_t entries = 0;
    for (const auto& w : leaves)
      entries += std::count(w.leaf.shards.begin(), w.leaf.shards.end(), shard) > 0;
    pk.pack_map(static_cast<uint32_t>(1 + entries));
    pack_str(pk, kChunkMarker);
    pk.pack_true();
    for (const auto& w : leaves) {
      const auto mine = std::count(w.leaf.shards.begin(), w.leaf.shards.end(), shard);
      if (!mine) continue;
      pack_str(pk, std::to_string(w.leaf.id));
      pk.pack_array(static_cast<uint32_t>(mine));
      for (size_t c = 0; c < w.leaf.slices.size(); ++c) {
        if (w.leaf.shards[c] != shard) continue;
        const VmoeSlice& s = w.leaf.slices[c];
        at::Tensor chunk = w.value;
        for (size_t d = 0; d < s.start.size(); ++d)
          chunk = chunk.narrow(static_cast<int64_t>(d), s.start[d], s.stop[d] - s.start[d]);
        chunk = chunk.contiguous().reshape({-1});
        pk.pack_array(2);
        // Sub-chunks of at most 1 GiB (flax's MAX_CHUNK_SIZE).
        const int64_t item = static_cast<int64_t>(chunk.element_size());
        const int64_t per = std::max<int64_t>(1, (int64_t{1} << 30) / item);
        const int64_t n = chunk.numel();
        const int64_t subs = std::max<int64_t>(1, (n + per - 1) / per);
        pk.pack_array(static_cast<uint32_t>(subs));
        for (int64_t k = 0; k < subs; ++k) {
          const int64_t begin = k * per, len = std::min(per, n - begin);
          msgpack::sbuffer nd;
          Packer pn(nd);
          pn.pack_array(3);
          pn.pack_array(1);
          pn.pack(len);
          pack_str(pn, w.leaf.dtype);
          pn.pack_bin(static_cast<uint32_t>(len * item));
          pn.pack_bin_body(static_cast<const char*>(chunk.data_ptr()) + begin * item, static_cast<uint32_t>(len * item));
          pack_ext(pk, kExtNdarray, nd);
        }
        pack_ext(pk, kExtSliceNd, slice_payload(s));
      }
    }
    char suffix[64];
    std::snprintf(suffix, sizeof suffix, ".data-%05d-of-%05d", shard, num_shards);
    write_file(prefix + suffix, b);
  }
  msgpack::sbuffer b;
  Packer pk(b);
  pk.pack_map(3);
  pack_str(pk, "shard_count");
  pk.pack(num_shards);
  pack_str(pk, "index");
  pack_index(pk, root);
  pack_str(pk, "version");
  pack_str(pk, kVersionV1);
  write_file(prefix + ".index", b);
}

}  // namespace moeprune
