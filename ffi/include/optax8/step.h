// The fused optimizer step: algorithms, the hyperparameter vector and the
// per-element update rules, shared by the CPU and CUDA handlers (host and
// device code) and mirrored by optax8/kernels/jax_step.py.
//
// One call updates one parameter leaf. Per element, with g the gradient, p
// the parameter (0 when the call has none) and s the float32 states
// (dequantized from their 8-bit codes):
//   bad = g is NaN or +-inf;  g = bad ? 0 : g;  g += wd_coupled * p
//   (s, d) = rule(algo, hyper, g, s)           the optimizer's direction d
//   u = scale * (d + wd * p)                   the update, in g's dtype
//   skipped elements (bad, or d or a new state not finite: an overflow such
//   as g * g for |g| > 1.8e19): u = 0 and every state of the element = 0
// then each state is requantized block-wise (quantize.h) with its new absmax.
#pragma once

#include <cstdint>

#include "optax8/algorithms.h"  // generated: Algo, Hyper, state maps
#include "optax8/quantize.h"

namespace optax8 {

// The hyperparameter vector as values of the rule's type F (a float or a
// SIMD vector with every lane equal): step_rule.inc reads h.v[slot], h.one.
template <typename F>
struct HyperF {
  F v[kNumHyper];
  F one;
};

}  // namespace optax8
