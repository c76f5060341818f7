// Precompiled header of the op library (not used by the per-instruction-set kernel files).
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
