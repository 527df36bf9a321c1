#include "core/pixel_code.h"

#include <vector>

#include "core/error.h"

namespace moeprune {
namespace {

[[noreturn]] void bad(const std::string& code, const std::string& why) {
  throw UserError(concat("config: data.domains has code '", code, "': ", why,
                         "; expected identity, invert, fold or bands:SPEC (e.g. bands:2,0r,3,1r)"));
}

}  // namespace

PixelCode pixel_code(const std::string& code) {
  PixelCode t{};
  if (code == "identity" || code == "invert") {
    for (int v = 0; v < 256; ++v) t[v] = static_cast<uint8_t>(code == "invert" ? 255 - v : v);
    return t;
  }
  if (code == "fold") {
    for (int v = 0; v < 256; ++v) t[v] = static_cast<uint8_t>((v / 32) % 2 == 0 ? 128 + v / 2 : 127 - v / 2);
    return t;
  }
  const std::string prefix = "bands:";
  if (code.compare(0, prefix.size(), prefix) != 0) bad(code, "unknown code");
  std::vector<int> to;
  std::vector<bool> rev;
  const std::string spec = code.substr(prefix.size());
  size_t pos = 0;
  for (;;) {  // one comma-separated entry per pass; an empty entry (",," or a trailing comma) is refused
    const size_t comma = spec.find(',', pos);
    std::string item = spec.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    const bool r = !item.empty() && item.back() == 'r';
    if (r) item.pop_back();
    if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos || item.size() > 3)
      bad(code, concat("band entry ", to.size(), " is not a band number (with an optional r)"));
    to.push_back(std::stoi(item));
    rev.push_back(r);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  const int B = static_cast<int>(to.size());
  if (B < 2 || 256 % B != 0) bad(code, concat(B, " bands; the band count must divide 256 and be at least 2"));
  std::vector<bool> used(static_cast<size_t>(B), false);
  for (int b : to) {
    if (b >= B) bad(code, concat("band ", b, " does not exist (bands 0..", B - 1, ")"));
    if (used[static_cast<size_t>(b)])
      bad(code, concat("band ", b, " is a destination twice (a permutation is expected)"));
    used[static_cast<size_t>(b)] = true;
  }
  const int w = 256 / B;
  for (int v = 0; v < 256; ++v) {
    const int b = v / w, o = v % w;
    t[v] = static_cast<uint8_t>(to[static_cast<size_t>(b)] * w + (rev[static_cast<size_t>(b)] ? w - 1 - o : o));
  }
  return t;
}

}  // namespace moeprune
