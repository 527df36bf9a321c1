// Mixed precision: bf16 autocast for a region of code (the forward pass), restoring
// the previous autocast state at exit. Parameters and optimiser state stay float32
// (master weights); the router opts out (RouterImpl::forward) so that routing
// decisions and auxiliary losses are computed in float32.
#pragma once
#include <c10/core/Device.h>

#include "core/choices.h"

namespace moeprune {

class AutocastGuard {
 public:
  // Fp32: a no-op.
  AutocastGuard(c10::Device device, Precision precision);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false;
  bool prev_enabled_ = false;
  c10::DeviceType type_;
  c10::ScalarType prev_dtype_;
};

// Turns autocast off for the device of a region (float32 islands inside a bf16 pass).
class NoAutocastGuard {
 public:
  explicit NoAutocastGuard(c10::DeviceType type);
  ~NoAutocastGuard();
  NoAutocastGuard(const NoAutocastGuard&) = delete;
  NoAutocastGuard& operator=(const NoAutocastGuard&) = delete;

 private:
  c10::DeviceType type_;
  bool prev_;
};

}  // namespace moeprune
