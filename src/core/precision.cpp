#include "core/precision.h"

#include <ATen/autocast_mode.h>
#include <ATen/cpu/Utils.h>

#include "core/hardware.h"

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

std::string cpu_bf16_warning() {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto has = [&](const char* k) {
    const auto it = caps.find(k);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  if (has("avx512_bf16") || has("amx_bf16")) return "";
  std::string name = "this CPU";
  if (const auto it = caps.find("cpu_name"); it != caps.end() && it->second.isString())
    name = "this CPU (" + it->second.toStringRef() + ")";
  return name + " has neither AVX512-BF16 nor AMX-BF16: bf16 matrix products are emulated and run slower than "
                "float32 (the tiny default's step: 9x slower on an AVX2-only EPYC); use precision fp32 on it";
}

NoAutocastGuard::NoAutocastGuard(c10::DeviceType type) : type_(type), prev_(at::autocast::is_autocast_enabled(type)) {
  if (prev_) at::autocast::set_autocast_enabled(type_, false);
}

NoAutocastGuard::~NoAutocastGuard() {
  if (prev_) at::autocast::set_autocast_enabled(type_, true);
}

}  // namespace moeprune
