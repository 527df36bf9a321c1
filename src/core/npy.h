// NumPy .npy files (format versions 1-3): what `moeprune predict` reads images from
// and writes logits to. Little-endian uint8, float32 and float64 arrays in C order.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace moeprune {

// The array as a CPU tensor of its dtype (uint8, float32 or float64). UserError
// naming the file when it is not such an .npy file (magic, header, dtype, Fortran
// order, size).
at::Tensor read_npy(const std::string& path);
// Writes a CPU tensor (uint8, float32 or float64) as .npy version 1.0, atomically.
void write_npy(const std::string& path, const at::Tensor& t);

}  // namespace moeprune
