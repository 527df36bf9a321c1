#include "core/npy.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moeprune {
namespace {

struct NpyType {
  const char* descr;
  at::ScalarType type;
};
constexpr NpyType kTypes[] = {{"|u1", at::kByte}, {"<f4", at::kFloat}, {"<f8", at::kDouble}};

// The value text of 'key' in the header dict, up to the next top-level comma or brace.
std::string field(const std::string& h, const std::string& key, const std::string& path) {
  const auto k = h.find("'" + key + "'");
  require(k != std::string::npos, concat("'", path, "' is not a valid .npy file: header has no '", key, "'"));
  auto v = h.find(':', k);
  require(v != std::string::npos, concat("'", path, "' is not a valid .npy file: bad header"));
  ++v;
  int depth = 0;
  size_t e = v;
  for (; e < h.size(); ++e) {
    const char c = h[e];
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
    if (depth < 0) break;
  }
  std::string s = h.substr(v, e - v);
  if (depth == 0 && e < h.size() && h[e] == ')') s += ')';
  const auto b = s.find_first_not_of(" "), en = s.find_last_not_of(" ");
  return b == std::string::npos ? "" : s.substr(b, en - b + 1);
}

}  // namespace

at::Tensor read_npy(const std::string& path) {
  std::error_code ec;
  require(std::filesystem::is_regular_file(path, ec), concat("'", path, "' is not a file (expected a NumPy .npy array)"));
  std::ifstream f(path, std::ios::binary);
  require(f.good(), concat("cannot open '", path, "': ", std::strerror(errno)));
  const auto size = static_cast<int64_t>(std::filesystem::file_size(path));
  auto bad = [&](const std::string& why) { throw UserError(concat("'", path, "' is not a valid .npy file: ", why)); };
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) bad("no \\x93NUMPY magic");
  const int major = static_cast<unsigned char>(magic[6]);
  if (major < 1 || major > 3) bad(concat("format version ", major, " is unknown"));
  uint32_t hlen = 0;
  unsigned char lb[4] = {0, 0, 0, 0};
  if (!f.read(reinterpret_cast<char*>(lb), major == 1 ? 2 : 4)) bad("truncated header");
  hlen = lb[0] | (lb[1] << 8) | (major == 1 ? 0u : (static_cast<uint32_t>(lb[2]) << 16) | (static_cast<uint32_t>(lb[3]) << 24));
  const int64_t data_start = 8 + (major == 1 ? 2 : 4) + hlen;
  if (hlen > (1u << 20) || data_start > size) bad(concat("header length ", hlen, " exceeds the file"));
  std::string h(hlen, '\0');
  f.read(h.data(), hlen);
  std::string descr = field(h, "descr", path);
  if (descr.size() >= 2 && (descr.front() == '\'' || descr.front() == '"')) descr = descr.substr(1, descr.size() - 2);
  if (descr == "<u1") descr = "|u1";
  const NpyType* t = nullptr;
  for (const auto& k : kTypes)
    if (descr == k.descr) t = &k;
  if (!t) bad(concat("dtype '", descr, "' is not supported (uint8, little-endian float32 or float64)"));
  if (field(h, "fortran_order", path) != "False") bad("Fortran-order arrays are not supported");
  const std::string shape_text = field(h, "shape", path);
  std::vector<int64_t> shape;
  {
    std::string s = shape_text;
    for (char& c : s)
      if (c == '(' || c == ')' || c == ',') c = ' ';
    std::istringstream in(s);
    for (std::string tok; in >> tok;) {
      if (tok.find_first_not_of("0123456789") != std::string::npos || tok.size() > 12) bad(concat("shape ", shape_text));
      shape.push_back(std::stoll(tok));
    }
  }
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(t->type));
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  if (size - data_start != bytes)
    bad(concat("shape ", shape_text, " needs ", bytes, " data bytes, the file has ", size - data_start));
  f.read(static_cast<char*>(out.data_ptr()), bytes);
  if (!f) bad("short read");
  return out;
}

void write_npy(const std::string& path, const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const NpyType* ty = nullptr;
  for (const auto& k : kTypes)
    if (k.type == c.scalar_type()) ty = &k;
  TORCH_CHECK(ty, "write_npy: unsupported dtype ", c.scalar_type());
  std::string shape = "(";
  for (int64_t d = 0; d < c.dim(); ++d) shape += std::to_string(c.size(d)) + (c.dim() == 1 || d + 1 < c.dim() ? "," : "");
  shape += ")";
  std::string h = concat("{'descr': '", ty->descr, "', 'fortran_order': False, 'shape': ", shape, ", }");
  while ((10 + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    require(f.good(), concat("cannot write '", tmp, "': ", std::strerror(errno)));
    const char head[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    f.write(head, 8);
    const auto n = static_cast<uint16_t>(h.size());
    const char len[2] = {static_cast<char>(n & 0xff), static_cast<char>(n >> 8)};
    f.write(len, 2);
    f.write(h.data(), static_cast<std::streamsize>(h.size()));
    f.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
    f.flush();
    require(f.good(), concat("writing '", tmp, "' failed: ", std::strerror(errno)));
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace moeprune
