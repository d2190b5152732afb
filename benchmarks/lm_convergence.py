"""Validation loss of the quickstart language model under each way of storing the optimizer state and params.

Trains copies of `examples/quickstart.py`'s transformer from the same initial
parameters on the same batches, in one jitted step, with AdamW
(the quickstart's schedule and arguments):

- ``float32``: optax.adamw, float32 params and state (the reference);
- ``8bit``: optax8.adamw8bit (round to nearest);
- ``8bit-stochastic``: optax8.adamw8bit(rounding='stochastic');
- ``4bit``: optax8.adamw8bit(bits=4) (4-bit moments, blocks of 128);
- ``bf16-params``: bfloat16 params, no float32 master weights, adamw8bit,
  the new params rounded to nearest (as optax.apply_updates rounds them);
- ``bf16-params-stochastic``: the same with param_rounding='stochastic'.

The bfloat16 models compute in float32 (their params are cast in the forward
pass), so they differ from ``8bit`` only in how the params are stored. Prints
each run's final validation loss, its difference from ``float32`` and its
params + optimizer state bytes per parameter, then ``RESULT {json}``;
``--figure PATH`` draws the validation curves.

    python benchmarks/lm_convergence.py                     # 900 steps, about 10 minutes on 2 CPU cores
    python benchmarks/lm_convergence.py --figure docs/figures/lm_convergence.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax8

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_quickstart():
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


QS = load_quickstart()
RUNS = {   # label: (optimizer factory of the quickstart's (schedule, **kwargs), params dtype)
    "float32": (optax.adamw, jnp.float32),
    "8bit": (optax8.adamw8bit, jnp.float32),
    "8bit-stochastic": (lambda lr, **kw: optax8.adamw8bit(lr, rounding="stochastic", **kw), jnp.float32),
    "4bit": (lambda lr, **kw: optax8.adamw8bit(lr, bits=4, **kw), jnp.float32),
    "bf16-params": (optax8.adamw8bit, jnp.bfloat16),
    "bf16-params-stochastic": (lambda lr, **kw: optax8.adamw8bit(lr, param_rounding="stochastic", **kw),
                               jnp.bfloat16),
}


def cast_params(model, dtype):
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))


quickstart_loss = QS.loss_fn


def loss_fn(model, tokens):
  """The quickstart's loss, computed in float32 whatever the params' dtype."""
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  model32 = nnx.merge(graph, jax.tree.map(lambda x: x.astype(jnp.float32), params), rest)
  return quickstart_loss(model32, tokens)


QS.loss_fn = loss_fn   # the quickstart's train_step (all runs in one jitted step) and evaluate compute it so
train_step, evaluate = QS.train_step, QS.evaluate


def figure(history: dict, path: str, steps: int):
  """The validation curves (left) and each run's difference from ``float32`` in percent (right)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4.2))
  loss_ax, diff_ax = fig.subplots(1, 2)
  steps_axis = np.asarray(history["val_steps"])
  ref = np.asarray(history["float32"])
  for label in history:
    if label == "val_steps":
      continue
    curve = np.asarray(history[label])
    loss_ax.plot(steps_axis, curve, marker="o", ms=3, lw=1.5, label=label)
    diff_ax.plot(steps_axis[1:], 100 * (curve[1:] - ref[1:]) / ref[1:], marker="o", ms=3, lw=1.5, label=label)
  loss_ax.set_ylim(top=1.25 * ref[min(1, len(ref) - 1)])
  loss_ax.set(xlabel="step", ylabel="validation cross-entropy (nats per byte)",
              title=f"quickstart LM, AdamW, {steps} steps")
  diff_ax.axhline(0, color="black", lw=0.8)
  diff_ax.set(xlabel="step", ylabel="validation loss against float32 (%)", title="difference from float32")
  for ax in (loss_ax, diff_ax):
    ax.grid(alpha=0.3)
  diff_ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=900)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--figure", help="write the validation curves to this PNG")
  args = ap.parse_args()
  t0 = time.perf_counter()
  data = QS.load_text()
  split = int(0.9 * len(data))
  train_data, val_data = data[:split], data[split:]
  val_tokens = jnp.asarray(QS.batches(val_data, np.random.default_rng(1), QS.VAL_BATCHES * QS.BATCH)).reshape(
      QS.VAL_BATCHES, QS.BATCH, -1)
  _, lr, kwargs = QS.OPTIMIZERS["adamw"][1:]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, args.steps // 20), args.steps, end_value=0.1 * lr)
  runs, sizes = {}, {}
  for label, (make, dtype) in RUNS.items():
    model = QS.LanguageModel(rngs=nnx.Rngs(args.seed))   # the same initial parameters in every run
    cast_params(model, dtype)
    optimizer = (nnx.Optimizer if make is optax.adamw else optax8.nnx.Optimizer)(model, make(schedule, **kwargs),
                                                                                  wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params))
    sizes[label] = (QS.state_bytes(params) + QS.state_bytes(nnx.state(optimizer, nnx.OptState))) / n
    runs[label] = (model, optimizer)
  history = {label: [] for label in RUNS} | {"val_steps": []}

  def validate(step):
    history["val_steps"].append(step)
    for label, (model, _) in runs.items():
      history[label].append(float(evaluate(model, val_tokens)))

  rng = np.random.default_rng(args.seed)
  eval_every = max(1, args.steps // 10)
  validate(0)
  for step in range(1, args.steps + 1):
    train_step(runs, jnp.asarray(QS.batches(train_data, rng, QS.BATCH)))
    if step % eval_every == 0 or step == args.steps:
      validate(step)
      print(f"step {step}: " + ", ".join(f"{k} {history[k][-1]:.4f}" for k in RUNS), flush=True)
  ref = history["float32"][-1]
  result = {"steps": args.steps, "params": n, "wall_s": round(time.perf_counter() - t0, 1), "runs": {}}
  print(f"{'run':24s} {'val loss':>9s} {'vs float32':>11s} {'params+state B/param':>21s}")
  for label in RUNS:
    loss = history[label][-1]
    print(f"{label:24s} {loss:9.4f} {(loss - ref) / ref:+11.2%} {sizes[label]:21.3f}")
    result["runs"][label] = {"val_loss": loss, "rel_to_float32": (loss - ref) / ref,
                             "bytes_per_param": sizes[label], "curve": history[label]}
  result["val_steps"] = history["val_steps"]
  if args.figure:
    figure(history, args.figure, args.steps)
    result["figure"] = args.figure
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
