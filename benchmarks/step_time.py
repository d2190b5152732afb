"""Optimizer step time per parameter: optax8 against optax (and bitsandbytes).

Times a jitted step ``(params, state, grads) -> (params, state)`` with
params and state donated, for optax's float32 optimizer and optax8's 8-bit
one in the same run; optax8 with ``tx.update`` + ``optax.apply_updates`` and
with :func:`optax8.apply_gradients` (the kernel writes the new params).
With ``--grads-inside`` the step instead takes the gradient of
``0.5 * sum((p - target)**2)`` itself (the gradient is then an intermediate,
as in training, but a trivial one that XLA fuses into optax's update).
With ``--mlp WIDTH`` it is a whole train step: ``jax.grad`` of a 4-layer
MLP (``--leaves`` layers of WIDTH x WIDTH, no biases) on a batch of
``--batch`` rows, and the step without an optimizer (gradients only) is
timed too. Prints ns per parameter and ratios, and each step's lowering and
compilation time (optax / update / apply_gradients). ``--leaves`` splits the
same total into many leaves (the cost should depend on the total, not the
number of leaves).

    python benchmarks/step_time.py --params 16777216 --leaves 16
    python benchmarks/step_time.py --params 16384000 --leaves 500 --optimizers adamw
    python benchmarks/step_time.py --mlp 2048 --leaves 4 --optimizers adamw
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

import optax8

OPTIONS = {}   # 8-bit options of every optax8 optimizer (--bits, --rounding, --param-rounding)
PAIRS = {
    "adamw": (lambda: optax.adamw(1e-3, weight_decay=1e-2),
              lambda: optax8.adamw8bit(1e-3, weight_decay=1e-2, **OPTIONS)),
    "adam": (lambda: optax.adam(1e-3), lambda: optax8.adam8bit(1e-3, **OPTIONS)),
    "lion": (lambda: optax.lion(1e-4), lambda: optax8.lion8bit(1e-4, **OPTIONS)),
    "sgd": (lambda: optax.sgd(1e-2, momentum=0.9), lambda: optax8.sgd8bit(1e-2, momentum=0.9, **OPTIONS)),
    "rmsprop": (lambda: optax.rmsprop(1e-3), lambda: optax8.rmsprop8bit(1e-3, **OPTIONS)),
    "adagrad": (lambda: optax.adagrad(1e-2), lambda: optax8.adagrad8bit(1e-2, **OPTIONS)),
    "lamb": (lambda: optax.lamb(1e-3), lambda: optax8.lamb8bit(1e-3, **OPTIONS)),
    "lars": (lambda: optax.lars(1e-2), lambda: optax8.lars8bit(1e-2, **OPTIONS)),
    "ademamix": (lambda: contrib.ademamix(1e-3), lambda: optax8.ademamix8bit(1e-3, **OPTIONS)),
    "muon": (lambda: contrib.muon(2e-2), lambda: optax8.muon8bit(2e-2, **OPTIONS)),
}


def make_tree(total: int, leaves: int, dtype, seed=0):
  per = total // leaves
  rng = np.random.default_rng(seed)
  cols = 1024 if per % 1024 == 0 else per
  return {f"p{i:04d}": jnp.asarray(rng.standard_normal((per // cols, cols)) * 0.1, dtype) for i in range(leaves)}


def _loss(params, targets):
  return sum(0.5 * jnp.sum(jnp.square(p.astype(jnp.float32) - t)) for p, t in
             zip(jax.tree.leaves(params), jax.tree.leaves(targets)))


def _mlp_loss(params, batch):
  x, y = batch
  layers = jax.tree.leaves(params)
  for w in layers[:-1]:
    x = jax.nn.relu(x @ w)
  return jnp.mean(jnp.square(x @ layers[-1] - y))


def time_step(tx, params, data, repeats: int, fused_apply: bool = False, grads_inside: bool = False,
              loss=_loss, chain: int = 1) -> tuple[float, float]:
  """Median seconds of one donated jitted step (``data``: the grads, or the loss's data), and the seconds its
  lowering and compilation took.

  With ``tx=None`` the step computes the gradients and adds them to the params.
  Each timed sample runs ``chain`` steps back to back and waits once (on a
  GPU this keeps the host's wait out of the step time).
  """
  def step(params, state, data):
    grads = jax.grad(loss)(params, data) if grads_inside else data
    if tx is None:
      return optax.apply_updates(params, grads), state
    if fused_apply:
      return optax8.apply_gradients(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params) if tx is not None else ()
  t0 = time.perf_counter()
  fn = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, data).compile()
  compile_s = time.perf_counter() - t0
  times = []
  jax.block_until_ready((params, state))
  for i in range(repeats + 2):
    t0 = time.perf_counter()
    for _ in range(chain):
      params, state = fn(params, state, data)
    # one output is ready when the whole computation is (walking a tree of
    # hundreds of leaves in Python would be timed too)
    jax.tree.leaves(params)[0].block_until_ready()
    if i >= 2:
      times.append((time.perf_counter() - t0) / chain)
  return float(np.median(times)), compile_s


def time_copy(params, repeats: int, chain: int = 1) -> float:
  fn = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
  x = jax.tree.map(jnp.copy, params)
  times = []
  for i in range(repeats + 2):
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    for _ in range(chain):
      x = fn(x)
    jax.block_until_ready(x)
    if i >= 2:
      times.append((time.perf_counter() - t0) / chain)
  return float(np.median(times))


def torch_adamw(total: int, repeats: int, eight_bit: bool, chain: int = 1):
  """Seconds of one step of bitsandbytes' AdamW8bit (``eight_bit``) or torch's
  own AdamW (fused on a GPU) on one tensor, on the GPU where JAX has one,
  else on the CPU; None if torch (or bitsandbytes) is not installed."""
  try:
    import torch
    if eight_bit:
      import bitsandbytes as bnb
  except ImportError:
    return None
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  p = torch.nn.Parameter(torch.randn(total, device=device) * 0.1)
  p.grad = torch.randn(total, device=device) * 0.01
  if eight_bit:
    opt = bnb.optim.AdamW8bit([p], lr=1e-3, weight_decay=1e-2, min_8bit_size=0)
  else:
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2, fused=device == "cuda")
  times = []
  for i in range(repeats + 2):
    sync()
    t0 = time.perf_counter()
    for _ in range(chain):
      opt.step()
    sync()
    if i >= 2:
      times.append((time.perf_counter() - t0) / chain)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--params", type=int, default=1 << 24)
  ap.add_argument("--leaves", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--optimizers", default="adamw", help="comma list of " + ",".join(PAIRS) + " or all")
  ap.add_argument("--bnb", action="store_true",
                  help="also time bitsandbytes' AdamW8bit and torch's AdamW (on the GPU where JAX has one)")
  ap.add_argument("--chain", type=int, default=1, help="steps per timed sample (one wait each)")
  ap.add_argument("--grads-inside", action="store_true", help="compute the gradient inside the step")
  ap.add_argument("--mlp", type=int, default=0, help="time a train step of an MLP of this width")
  ap.add_argument("--batch", type=int, default=32, help="batch rows of --mlp")
  ap.add_argument("--rounding", default="nearest", help="optax8's rounding: nearest or stochastic")
  ap.add_argument("--param-rounding", default="nearest",
                  help="optax8's param_rounding (with --dtype bfloat16): nearest or stochastic")
  ap.add_argument("--bits", type=int, default=8, help="optax8's bits: 8 or 4")
  args = ap.parse_args()
  OPTIONS.update(rounding=args.rounding, param_rounding=args.param_rounding, bits=args.bits)
  names = list(PAIRS) if args.optimizers == "all" else args.optimizers.split(",")
  loss = _loss
  if args.mlp:
    w = args.mlp
    args.grads_inside, loss = True, _mlp_loss
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.standard_normal((w, w)) / np.sqrt(w), jnp.dtype(args.dtype))
              for i in range(args.leaves)}
    data = (jnp.asarray(rng.standard_normal((args.batch, w)), jnp.float32),
            jnp.asarray(rng.standard_normal((args.batch, w)), jnp.float32))
  else:
    params = make_tree(args.params, args.leaves, jnp.dtype(args.dtype))
    data = make_tree(args.params, args.leaves, jnp.float32 if args.grads_inside else jnp.dtype(args.dtype), seed=1)
    if not args.grads_inside:
      data = jax.tree.map(lambda x: x * 0.01, data)
  n = sum(x.size for x in jax.tree.leaves(params))
  what = f"MLP train step, batch {args.batch}" if args.mlp else "grads " + ("inside" if args.grads_inside else "given")
  print(f"# {jax.devices()[0].device_kind} backend={optax8.backends()} jax {jax.__version__}; "
        f"{n} params in {args.leaves} leaves, {args.dtype}, {what}, bits {args.bits}, rounding {args.rounding}, "
        f"param_rounding {args.param_rounding}")
  if args.mlp:
    t, _ = time_step(None, params, data, args.repeats, grads_inside=True, loss=loss, chain=args.chain)
    print(f"gradients only (p + grad, no optimizer): {t / n * 1e9:.3f} ns/param")
  copy = time_copy(params, args.repeats, args.chain)
  print(f"copy (x + 1): {copy / n * 1e9:.3f} ns/param, {2 * n * jnp.dtype(args.dtype).itemsize / copy / 1e9:.1f} GB/s")
  rows = []
  for name in names:
    ref, ours = PAIRS[name]
    kw = dict(grads_inside=args.grads_inside, loss=loss, chain=args.chain)
    t_ref, c_ref = time_step(ref(), params, data, args.repeats, **kw)
    t_ours, c_ours = time_step(ours(), params, data, args.repeats, **kw)
    t_apply, c_apply = time_step(ours(), params, data, args.repeats, fused_apply=True, **kw)
    row = dict(optimizer=name, ns_optax=t_ref / n * 1e9, ns_optax8_update=t_ours / n * 1e9,
               ns_optax8_apply=t_apply / n * 1e9, ratio_update=t_ours / t_ref, ratio_apply=t_apply / t_ref,
               compile_s_optax=c_ref, compile_s_optax8_update=c_ours, compile_s_optax8_apply=c_apply)
    rows.append(row)
    print(f"{name:9s} optax {row['ns_optax']:6.3f} ns/param | optax8 update {row['ns_optax8_update']:6.3f} "
          f"({row['ratio_update']:.2f}x) | optax8 apply_gradients {row['ns_optax8_apply']:6.3f} "
          f"({row['ratio_apply']:.2f}x) | compile {c_ref:.2f} / {c_ours:.2f} / {c_apply:.2f} s")
  extra = dict(copy_ns=copy / n * 1e9, params=n, leaves=args.leaves, dtype=args.dtype,
               device=jax.devices()[0].device_kind)
  if args.bnb:
    for key, label, eight_bit in (("bnb_adamw8bit_ns", "bitsandbytes AdamW8bit", True),
                                  ("torch_adamw_ns", "torch AdamW", False)):
      t = torch_adamw(n, max(3, args.repeats // 3), eight_bit, args.chain)
      if t is None:
        print(f"{label}: not installed")
      else:
        extra[key] = t / n * 1e9
        ref = rows[0]["ns_optax"] if rows else float("nan")
        print(f"{label} (torch): {t / n * 1e9:.3f} ns/param ({t / n * 1e9 / ref:.2f}x optax {rows[0]['optimizer']})"
              if rows else f"{label} (torch): {t / n * 1e9:.3f} ns/param")
  print("JSON " + json.dumps(rows))
  print("JSON_EXTRA " + json.dumps(extra))


if __name__ == "__main__":
  main()
