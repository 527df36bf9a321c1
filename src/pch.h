// Precompiled header for moeprune's torch translation units: kept small on
// purpose (ATen and the nn module base), since build time is a feature.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/autograd.h>
#include <string>
#include <vector>
#include <memory>
