// Derived seeds: every random draw in moeprune comes from a generator seeded by a
// mix of the job seed and counters (layer, expert, epoch, step, ...), so results do
// not depend on which rank draws or how many ranks there are.
#pragma once
#include <cstdint>

namespace moeprune {

// splitmix64 over three values: distinct, well-mixed seeds for distinct triples.
inline uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c) {
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(a) ^ b) ^ c);
}

}  // namespace moeprune
