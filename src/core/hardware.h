// What the processor offers, where it changes what a user should choose.
#pragma once
#include <string>

namespace moeprune {

// Empty when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16);
// otherwise one line saying that bf16 autocast on it is emulated and slower than
// float32 (PyTorch then converts every bf16 GEMM operand in software).
std::string cpu_bf16_warning();

}  // namespace moeprune
