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

#include "optax8/quantize.h"

namespace optax8 {

// Algorithms (the `algo` attribute); numbers are part of the ABI with Python.
enum Algo : int64_t {
  kAdam = 0,      // m (signed), v (unsigned)
  kLion = 1,      // m (signed)
  kMomentum = 2,  // m (signed): SGD with momentum, LARS
  kRms = 3,       // v (unsigned): RMSprop
  kRss = 4,       // v (unsigned): Adagrad
  kAdemamix = 5,  // m1 (signed), m2 (signed), v (unsigned)
};
constexpr int kNumAlgos = 6;
constexpr int kMaxStates = 3;

OPTAX8_HD int algo_states(int64_t algo) {
  return algo == kAdam ? 2 : algo == kAdemamix ? 3 : 1;
}
// The map of state i of algo.
OPTAX8_HD int64_t state_map(int64_t algo, int i) {
  switch (algo) {
    case kAdam: return i == 0 ? kSignedMap : kUnsignedMap;
    case kRms: case kRss: return kUnsignedMap;
    case kAdemamix: return i == 2 ? kUnsignedMap : kSignedMap;
    default: return kSignedMap;
  }
}

// Slots of the float32 hyperparameter vector (a device buffer, so a new
// learning rate or step count never recompiles).
enum Hyper : int {
  kScale = 0,       // final multiplier of the update (-learning_rate, or 1)
  kB1 = 1,          // first-moment decay (momentum for kMomentum)
  kOneMinusB1 = 2,
  kB2 = 3,          // second-moment decay (RMSprop's decay)
  kOneMinusB2 = 4,
  kB3 = 5,          // AdEMAMix slow EMA decay
  kOneMinusB3 = 6,
  kEps = 7,          // added outside the square root
  kEpsRoot = 8,      // added inside the square root (RMSprop's and Adagrad's eps in optax)
  kWeightDecay = 9,   // decoupled: added to the direction (AdamW, Lion, AdEMAMix)
  kCoupledDecay = 10, // coupled: added to the gradient (SGD, RMSprop, Adagrad, LARS)
  kInvBias1 = 11,     // 1 / (1 - b1**t)
  kInvBias2 = 12,     // 1 / (1 - b2**t)
  kInvBias1Next = 13, // 1 / (1 - b1**(t+1)) (Nesterov Adam)
  kAlpha = 14,        // AdEMAMix mixing coefficient
  kPreScale = 15,     // multiplies the gradient before momentum (LARS: -lr * trust ratio)
  kNesterov = 16,     // 0 or 1
  kNumHyper = 17,
};

// The hyperparameter vector as values of the rule's type F (a float or a
// SIMD vector with every lane equal): step_rule.inc reads h.v[slot], h.one.
template <typename F>
struct HyperF {
  F v[kNumHyper];
  F one;
};

}  // namespace optax8
