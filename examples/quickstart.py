"""optax8 quickstart: train a small transformer language model with optax and with optax8, side by side.

A byte-level decoder-only transformer (Flax nnx, 0.48M parameters) learns
to continue English text. The text is the Python Language Reference's help
topics, which ship with every Python installation (``pydoc_data.topics``, the
text behind ``help("assert")``): about 465 KB, nothing to download. The last
10% (from the middle of the "typesmapping" topic on: the built-in types and the
last statements) is held out for validation; this model predicts it better
than the average text, so the validation loss sits below the training loss.

Two copies of the model start from the same parameters and see the same
batches: one trained with ``optax.<name>`` (float32 state) through
``nnx.Optimizer``, one with ``optax8.<name>8bit`` (block-wise 8-bit state)
through ``optax8.nnx.Optimizer`` (the same optimizer whose update lets the
kernels write the new parameters). The script shows a progress
bar with both training losses, writes the train and validation loss curves to
a PNG, prints the optimizer-state bytes of both and ends with one line
``RESULT {json}``.

    python examples/quickstart.py                          # adamw, about 3 minutes on 2 CPU cores
    python examples/quickstart.py --optimizer lion --steps 1000 --plot lion.png
    python examples/quickstart.py --bits 4                 # 4-bit states
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend, no global state
from optax import contrib
from tqdm import tqdm

import optax8

SEQ_LEN = 128
BATCH = 16
VAL_BATCHES = 8

# Peak learning rate and extra arguments per optimizer; the same for optax and optax8. The Adam family uses
# b2 = 0.95, as is usual for transformers.
OPTIMIZERS = {
    "adamw": (optax.adamw, optax8.adamw8bit, 3e-3, {"b2": 0.95, "weight_decay": 0.01}),
    "adam": (optax.adam, optax8.adam8bit, 3e-3, {"b2": 0.95}),
    "lion": (optax.lion, optax8.lion8bit, 3e-4, {"weight_decay": 0.01}),
    "sgd": (optax.sgd, optax8.sgd8bit, 0.1, {"momentum": 0.9}),
    "rmsprop": (optax.rmsprop, optax8.rmsprop8bit, 1e-3, {}),
    "adagrad": (optax.adagrad, optax8.adagrad8bit, 3e-2, {}),
    "lamb": (optax.lamb, optax8.lamb8bit, 1e-2, {"b2": 0.95}),
    "lars": (optax.lars, optax8.lars8bit, 1.0, {}),
    "ademamix": (contrib.ademamix, optax8.ademamix8bit, 3e-3, {"b2": 0.95}),
}


def load_text() -> np.ndarray:
  """The Python Language Reference's help topics as UTF-8 bytes (tokens 0..255)."""
  from pydoc_data.topics import topics
  text = "\n\n".join(topics[k] for k in sorted(topics))
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention and a 4x MLP."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)  # one (d, 3d) kernel: blocks of 256 along 3d
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
    self.out = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads)
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
    x = x + self.proj(y.reshape(b, t, d))
    return x + self.out(nnx.gelu(self.fc(self.ln2(x))))


class LanguageModel(nnx.Module):
  """Byte-level decoder: token and position embeddings, ``layers`` blocks, a final norm and a linear head."""

  def __init__(self, *, d: int = 128, heads: int = 4, layers: int = 2, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.pos = nnx.Embed(SEQ_LEN, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, 256, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def make_optimizers(name: str, steps: int, bits: int = 8) -> tuple[optax.GradientTransformation,
                                                                    optax.GradientTransformation]:
  """``optax.<name>`` and ``optax8.<name>8bit`` (with ``bits``) with the same warmup-cosine schedule and
  arguments."""
  ref, ours, lr, kwargs = OPTIMIZERS[name]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, end_value=0.1 * lr)
  return ref(schedule, **kwargs), ours(schedule, **kwargs, bits=bits)


def state_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit(donate_argnums=0)
def train_step(runs: dict, tokens):
  """One step of every ``(model, optimizer)`` of ``runs`` on the same tokens: ``{label: loss}``.

  ``runs`` is donated, so parameters and optimizer states are updated in place.
  """
  losses = {}
  for label, (model, optimizer) in runs.items():
    losses[label], grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
  return losses


@nnx.jit
def evaluate(model, tokens):
  """Mean loss over ``tokens`` of shape ``(batches, BATCH, SEQ_LEN + 1)``."""
  return jnp.mean(jax.lax.map(lambda t: loss_fn(model, t), tokens))


def batches(data: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
  """``n`` random windows of ``SEQ_LEN + 1`` bytes: inputs and next-byte targets."""
  starts = rng.integers(0, len(data) - SEQ_LEN - 1, n)
  return np.stack([data[s:s + SEQ_LEN + 1] for s in starts]).astype(np.int32)


def plot(history: dict, name: str, path: str):
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  for label, color in (("32bit", "tab:blue"), ("8bit", "tab:orange")):
    who = f"optax.{name}" if label == "32bit" else f"optax8.{name}8bit"
    train = np.asarray(history[f"train_{label}"])
    k = min(20, len(train))  # moving average over 20 steps
    smooth = np.convolve(train, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k, len(train) + 1), smooth, color=color, alpha=0.5, lw=1, label=f"{who} train")
    ax.plot(history["val_steps"], history[f"val_{label}"], color=color, marker="o", ms=3, lw=1.5,
            label=f"{who} validation")
  top = 1.25 * history["val_32bit"][min(1, len(history["val_32bit"]) - 1)]  # zoom in past the first drop
  if np.isfinite(top):
    ax.set_ylim(top=top)
  ax.set(xlabel="step", ylabel="cross-entropy (nats per byte)", title=f"byte-level LM on pydoc topics: {name}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=900, help="training steps (default 900)")
  ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
  ap.add_argument("--plot", default="quickstart.png", help="where to write the loss curves (PNG)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--bits", type=int, choices=(8, 4), default=8, help="optax8's state: 8-bit (default) or 4-bit")
  args = ap.parse_args()
  if args.steps < 1:
    ap.error("--steps must be at least 1")
  t0 = time.perf_counter()

  data = load_text()
  split = int(0.9 * len(data))
  train_data, val_data = data[:split], data[split:]
  val_tokens = jnp.asarray(batches(val_data, np.random.default_rng(1), VAL_BATCHES * BATCH))
  print(f"optax8 {optax8.__version__} ({optax8.backends()['cpu']} backend on cpu); "
        f"text: pydoc_data.topics, {len(train_data):,} train and {len(val_data):,} validation bytes")

  tx32, tx8 = make_optimizers(args.optimizer, args.steps, args.bits)
  models = [LanguageModel(rngs=nnx.Rngs(args.seed)) for _ in range(2)]   # the same parameters, twice
  runs = {"32bit": (models[0], nnx.Optimizer(models[0], tx32, wrt=nnx.Param)),
          "8bit": (models[1], optax8.nnx.Optimizer(models[1], tx8, wrt=nnx.Param))}
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(models[0], nnx.Param)))
  bytes32, bytes8 = (state_bytes(nnx.state(runs[k][1], nnx.OptState)) for k in ("32bit", "8bit"))
  print(f"model: {n_params:,} parameters; optimizer state: optax.{args.optimizer} {bytes32:,} bytes, "
        f"optax8.{args.optimizer}8bit {bytes8:,} bytes ({bytes8 / bytes32:.3f}x)")
  val_tokens = val_tokens.reshape(VAL_BATCHES, BATCH, -1)

  history = {k: [] for k in ("train_32bit", "train_8bit", "val_32bit", "val_8bit", "val_steps")}

  def validate(step):
    history["val_steps"].append(step)
    for label, (model, _) in runs.items():
      history[f"val_{label}"].append(float(evaluate(model, val_tokens)))

  rng = np.random.default_rng(args.seed)
  eval_every = max(1, args.steps // 10)
  validate(0)
  bar = tqdm(range(1, args.steps + 1), desc=f"{args.optimizer} vs {args.optimizer}8bit", unit="step")
  for step in bar:
    tokens = jnp.asarray(batches(train_data, rng, BATCH))
    losses = train_step(runs, tokens)
    for label, loss in losses.items():
      history[f"train_{label}"].append(loss)
    if step % eval_every == 0 or step == args.steps:
      validate(step)
    if step % 10 == 0 or step == args.steps:
      bar.set_postfix(loss_32bit=f"{float(history['train_32bit'][-1]):.3f}",
                      loss_8bit=f"{float(history['train_8bit'][-1]):.3f}")
  bar.close()
  for label in ("32bit", "8bit"):
    history[f"train_{label}"] = [float(x) for x in history[f"train_{label}"]]

  plot(history, args.optimizer, args.plot)
  loss32, loss8 = history["val_32bit"][-1], history["val_8bit"][-1]
  print(f"validation loss after {args.steps} steps: optax.{args.optimizer} {loss32:.4f}, "
        f"optax8.{args.optimizer}8bit {loss8:.4f} ({abs(loss8 - loss32) / loss32:.2%} apart); plot: {args.plot}")
  print("RESULT " + json.dumps({
      "optimizer": args.optimizer, "bits": args.bits, "steps": args.steps, "params": n_params,
      "loss_32bit": loss32, "loss_8bit": loss8, "loss_rel_diff": abs(loss8 - loss32) / loss32,
      "initial_loss": history["val_32bit"][0],
      "state_bytes_32bit": bytes32, "state_bytes_8bit": bytes8, "state_ratio": bytes8 / bytes32,
      "plot": args.plot, "wall_s": round(time.perf_counter() - t0, 1), "backend": optax8.backends()["cpu"]}))


if __name__ == "__main__":
  main()
