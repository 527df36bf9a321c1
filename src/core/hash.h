// FNV-1a (64 bit): a stable hash of bytes, the same on every toolchain and run
// (std::hash is neither). Used for config fingerprints and pruning-plan agreement.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace moeprune {

inline constexpr uint64_t kFnvOffset = 1469598103934665603ULL;

class Fnv1a {
 public:
  void add_bytes(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) {
      h_ ^= p[i];
      h_ *= 1099511628211ULL;
    }
  }
  void add(std::string_view s) { add_bytes(s.data(), s.size()); }
  // The 8 little-endian bytes of v.
  void add(uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      const unsigned char b = static_cast<unsigned char>((v >> (8 * i)) & 0xff);
      add_bytes(&b, 1);
    }
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = kFnvOffset;
};

inline uint64_t fnv1a64(std::string_view s) {
  Fnv1a h;
  h.add(s);
  return h.value();
}

// 16 lower-case hex digits.
inline std::string hex64(uint64_t v) {
  static const char* d = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) s[static_cast<size_t>(i)] = d[v & 15];
  return s;
}

}  // namespace moeprune
