// Precompiled header of the bpt library, the apps and (with Catch2) the tests.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
