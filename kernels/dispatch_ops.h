// The per-thread work of the dispatcher kernels, written once for the device and
// the host. dispatch_kernels.cu launches these functions over CUDA grids; on the CPU
// src/model/fused_dispatch.cpp runs the very same functions in loops over the same
// index space, so the CPU test suite exercises the kernels' index arithmetic,
// rounding and accumulation order against the PyTorch-op oracle in src/model even
// on machines without a GPU. No CUDA or torch header is needed here.
//
// Layouts (all row-major, int64 indices as PyTorch gives them):
//   top-k:    probs [N, E] float -> expert [N, K] int64, gate [N, K] float
//   slots:    expert [G, S, K], order [G, S] (priority order of the group's tokens)
//             -> position [G, S, K] int64, keep [G, S, K] bool. The choice-major
//             sequence of group g is q = j * S + i -> token order[g, i], choice j.
//             It is cut into `chunks` pieces; count() counts expert e in a piece,
//             assign() numbers them after the pieces before it. Tokens marked
//             invalid are skipped (the caller presets position -1, keep false).
//   permute:  out[a, :] = x[index[a], :] * (scale ? scale[a] : 1)
//   combine:  out[n, :] = sum_j weight[n, j] * y[row_of[n, j], :]  (row_of < 0: none),
//             accumulated in float in j order, rounded once.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MP_HD __host__ __device__ __forceinline__
#else
#define MP_HD inline
#endif

namespace moeprune::kernels {

// bfloat16 as raw bits (the layout of c10::BFloat16 and __nv_bfloat16), with
// round-to-nearest-even conversion from float, as PyTorch rounds.
struct bf16 {
  uint16_t bits;
};

MP_HD float to_float(float v) { return v; }
MP_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}
MP_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}
MP_HD float to_float(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

template <typename T>
MP_HD T from_float(float v);
template <>
MP_HD float from_float<float>(float v) {
  return v;
}
template <>
MP_HD bf16 from_float<bf16>(float v) {
  uint32_t u = float_to_bits(v);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a quiet NaN
    r.bits = static_cast<uint16_t>((u >> 16) | 0x0040u);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = static_cast<uint16_t>(u >> 16);
  return r;
}

// ---- top-k selection of one token: repeated arg-max, ties to the lower expert index.
// NaN probabilities are never selected before a number. K <= kMaxTopK.
constexpr int kMaxTopK = 8;
MP_HD void topk_row(const float* p, int E, int K, int64_t* expert, float* gate) {
  int64_t chosen[kMaxTopK];
  for (int j = 0; j < K; ++j) {
    int best = -1;
    float bv = 0.f;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
      if (taken) continue;
      const float v = p[e];
      if (best < 0 || v > bv || (bv != bv && v == v)) {
        best = e;
        bv = v;
      }
    }
    chosen[j] = best;
    expert[j] = best;
    gate[j] = bv;
  }
}

// ---- capacity assignment, piece c of group g for expert e.
struct SlotArgs {
  const int64_t* expert;  // [G, S, K]
  const int64_t* order;   // [G, S]
  const bool* valid;      // [G, S] or null: invalid tokens take no slot (their outputs are left as set)
  int64_t* counts;        // [G, E, chunks]
  int64_t* position;      // [G, S, K]
  bool* keep;             // [G, S, K]
  int64_t S, K, E, chunks, capacity;
};

MP_HD int64_t slot_chunk_len(const SlotArgs& a) { return (a.S * a.K + a.chunks - 1) / a.chunks; }

// Thread t of a pass over G * E * chunks: (group, expert, piece), piece fastest.
MP_HD void slot_thread(const SlotArgs& a, int64_t t, int64_t& g, int64_t& e, int64_t& c) {
  c = t % a.chunks;
  e = (t / a.chunks) % a.E;
  g = t / (a.chunks * a.E);
}

MP_HD void slot_count(const SlotArgs& a, int64_t g, int64_t e, int64_t c) {
  const int64_t len = slot_chunk_len(a), n = a.S * a.K;
  const int64_t q0 = c * len, q1 = q0 + len < n ? q0 + len : n;
  int64_t count = 0;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t j = q / a.S, t = a.order[g * a.S + q % a.S];
    if (a.valid && !a.valid[g * a.S + t]) continue;
    count += a.expert[(g * a.S + t) * a.K + j] == e;
  }
  a.counts[(g * a.E + e) * a.chunks + c] = count;
}

MP_HD void slot_assign(const SlotArgs& a, int64_t g, int64_t e, int64_t c) {
  int64_t next = 0;
  for (int64_t b = 0; b < c; ++b) next += a.counts[(g * a.E + e) * a.chunks + b];
  const int64_t len = slot_chunk_len(a), n = a.S * a.K;
  const int64_t q0 = c * len, q1 = q0 + len < n ? q0 + len : n;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t j = q / a.S, t = a.order[g * a.S + q % a.S];
    const int64_t at = (g * a.S + t) * a.K + j;
    if (a.expert[at] != e || (a.valid && !a.valid[g * a.S + t])) continue;
    a.position[at] = next;
    a.keep[at] = next < a.capacity;
    ++next;
  }
}

// ---- permute: elements [h0, h0 + len) of output row a (len 1 on the device's
// scalar path, a whole row on the host).
template <typename T>
MP_HD void permute_span(const T* __restrict__ x, const int64_t* __restrict__ index, const float* __restrict__ scale,
                        T* __restrict__ out, int64_t H, int64_t a, int64_t h0, int64_t len) {
  const T* src = x + index[a] * H + h0;
  T* dst = out + a * H + h0;
  if (scale) {
    const float s = scale[a];
    for (int64_t i = 0; i < len; ++i) dst[i] = from_float<T>(to_float(src[i]) * s);
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = src[i];
  }
}

// ---- unpermute + combine: elements [h0, h0 + len) of output row n, accumulated in
// acc (len floats of scratch) over the token's choices in j order, rounded once.
template <typename T>
MP_HD void combine_span(const T* __restrict__ y, const int64_t* __restrict__ row_of, const float* __restrict__ weight,
                        T* __restrict__ out, float* __restrict__ acc, int64_t K, int64_t H, int64_t n, int64_t h0,
                        int64_t len) {
  for (int64_t i = 0; i < len; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t r = row_of[n * K + j];
    if (r < 0) continue;
    const T* src = y + r * H + h0;
    if (weight) {
      const float w = weight[n * K + j];
      for (int64_t i = 0; i < len; ++i) acc[i] += w * to_float(src[i]);
    } else {
      for (int64_t i = 0; i < len; ++i) acc[i] += to_float(src[i]);
    }
  }
  T* dst = out + n * H + h0;
  for (int64_t i = 0; i < len; ++i) dst[i] = from_float<T>(acc[i]);
}

}  // namespace moeprune::kernels
