#include "core/precision.h"

#include <ATen/autocast_mode.h>

namespace moeprune {

AutocastGuard::AutocastGuard(c10::Device device, Precision precision)
    : type_(device.type()), prev_dtype_(at::kFloat) {
  if (precision != Precision::Bf16) return;
  active_ = true;
  prev_enabled_ = at::autocast::is_autocast_enabled(type_);
  prev_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_dtype(type_, at::kBFloat16);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();  // cached bf16 weight copies
  at::autocast::set_autocast_enabled(type_, prev_enabled_);
  at::autocast::set_autocast_dtype(type_, prev_dtype_);
}

NoAutocastGuard::NoAutocastGuard(c10::DeviceType type) : type_(type), prev_(at::autocast::is_autocast_enabled(type)) {
  if (prev_) at::autocast::set_autocast_enabled(type_, false);
}

NoAutocastGuard::~NoAutocastGuard() {
  if (prev_) at::autocast::set_autocast_enabled(type_, true);
}

}  // namespace moeprune
