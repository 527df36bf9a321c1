// `moeprune ckpt inspect|verify|export`: single-process tools over a checkpoint
// directory (or a root, standing for its latest checkpoint).
#pragma once
#include <string>

namespace moeprune {

// Label, world size, each state section's small fields, experts per MoE block by rank, files.
std::string inspect_checkpoint(const std::string& dir);
// Sizes and CRC-32 of every file; returns the one-line summary. UserError on a mismatch.
std::string verify_checkpoint(const std::string& dir);
// Writes every tensor (experts stacked per layer in id order, optimiser state
// included under "optim.*") to one safetensors file.
void export_checkpoint(const std::string& dir, const std::string& out);

}  // namespace moeprune
