"""Lion on optax's Rosenbrock problem: float32, optax8's 8-bit state, and bitsandbytes' rule.

optax's own test problem (optax/_src/alias_test.py): Rosenbrock from (0, 0),
learning rate 1e-2, weight decay 1e-4, 10,000 steps. Three runs in one JAX
program:

- ``optax.lion``: the float32 reference;
- ``optax8.lion8bit`` (``min_8bit_size=0``): 8-bit momentum with the signed
  map's signed absmax;
- ``bnb rule``: the same 8-bit momentum with bitsandbytes' positive absmax
  (``absmax = max |m|``, the nearest value of the same map), written here in
  jnp: the block's most negative momentum comes back 0.7% smaller at every
  step, since the map has no -1.

Prints each run's final point and writes ``docs/figures/lion_rosenbrock.png``
(the paths over the loss's contours, and the distance to the minimum (1, 1)
against the step) with ``--figure``. ``--four-bit`` adds the runs at 4 bits
(round to nearest and stochastic rounding), the 8-bit stochastic one, and a
momentum rounded stochastically to 15 evenly spaced levels of its block's
absmax (jnp, a random key in the state): the median distance to (1, 1) over
the steps after the first fifth tells a run that wanders near the minimum
from one that stops, and the share of the steps spent jumping between two
points (Lion's two-step cycle) tells how often a run moves on.

    python benchmarks/lion_rosenbrock.py [--steps 10000] [--figure] [--four-bit]
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax8
from optax8 import maps

LR, WEIGHT_DECAY, B1, B2 = 1e-2, 1e-4, 0.9, 0.99
FIGURE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "figures" / "lion_rosenbrock.png"


def rosenbrock(x):
  return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def bnb_quantize(m):
  """bitsandbytes' block-wise round trip of one block: absmax = max |m|, the nearest value of the signed map."""
  values, mids = jnp.asarray(maps.dynamic_map(maps.SIGNED)), jnp.asarray(maps.midpoints(maps.SIGNED)[:255])
  absmax = jnp.max(jnp.abs(m))
  v = jnp.where(absmax > 0, m / jnp.where(absmax > 0, absmax, 1), 0)
  return values[jnp.searchsorted(mids, v, side="left")] * absmax


def bnb_lion8bit() -> optax.GradientTransformation:
  """Lion whose momentum is stored in 8 bits by bitsandbytes' rule (one block: the problem has 2 parameters)."""

  def init(params):
    return jnp.zeros_like(params)

  def update(grads, m, params):
    direction = jnp.sign(B1 * m + (1 - B1) * grads)
    m = bnb_quantize(B2 * m + (1 - B2) * grads)
    return -LR * (direction + WEIGHT_DECAY * params), m

  return optax.GradientTransformation(init, update)


def path(tx, steps: int) -> np.ndarray:
  """The points of ``steps`` steps of ``tx`` from (0, 0), the start included."""
  x0 = jnp.zeros(2)

  def step(carry, _):
    x, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(x), state, x)
    x = optax.apply_updates(x, updates)
    return (x, state), x

  _, xs = jax.jit(lambda: jax.lax.scan(step, (x0, tx.init(x0)), None, length=steps))()
  return np.concatenate([np.zeros((1, 2)), np.asarray(xs)])


def cycling(xs: np.ndarray) -> np.ndarray:
  """Whether each step reverses both coordinates' moves of the step before: Lion's two-step cycle, where the
  gradient's term (1 - b1) g outweighs the momentum's in the sign and the point jumps between two points."""
  moves = np.sign(np.diff(xs, axis=0))
  return np.all(moves[1:] == -moves[:-1], axis=1)


def uniform_sr_lion(levels: int = 15, seed: int = 0) -> optax.GradientTransformation:
  """Lion whose momentum is rounded stochastically (unbiased) to ``levels`` evenly spaced values in
  [-absmax, absmax], absmax = max |m| (one block: the problem has 2 parameters)."""
  grid = jnp.linspace(-1.0, 1.0, levels)

  def init(params):
    return jnp.zeros_like(params), jax.random.key(seed)

  def update(grads, state, params):
    m, key = state
    key, draw = jax.random.split(key)
    direction = jnp.sign(B1 * m + (1 - B1) * grads)
    m = B2 * m + (1 - B2) * grads
    absmax = jnp.max(jnp.abs(m))
    x = jnp.where(absmax > 0, m / jnp.where(absmax > 0, absmax, 1), 0)
    i = jnp.clip(jnp.searchsorted(grid, x, side="right") - 1, 0, levels - 2)
    up = jax.random.uniform(draw, x.shape) < (x - grid[i]) / (grid[i + 1] - grid[i])
    return -LR * (direction + WEIGHT_DECAY * params), (jnp.where(up, grid[i + 1], grid[i]) * absmax, key)

  return optax.GradientTransformation(init, update)


RUNS = {
    "optax.lion (float32)": lambda: optax.lion(LR, weight_decay=WEIGHT_DECAY),
    "optax8.lion8bit (signed absmax)": lambda: optax8.lion8bit(LR, weight_decay=WEIGHT_DECAY, min_8bit_size=0),
    "bnb rule (positive absmax)": bnb_lion8bit,
}

FOUR_BIT_RUNS = {
    "optax8.lion8bit, 8 bits, stochastic": lambda: optax8.lion8bit(LR, weight_decay=WEIGHT_DECAY, min_8bit_size=0,
                                                                   rounding="stochastic"),
    "optax8.lion8bit, 4 bits, nearest": lambda: optax8.lion8bit(LR, weight_decay=WEIGHT_DECAY, min_8bit_size=0,
                                                                bits=4),
    "optax8.lion8bit, 4 bits, stochastic": lambda: optax8.lion8bit(LR, weight_decay=WEIGHT_DECAY, min_8bit_size=0,
                                                                   bits=4, rounding="stochastic"),
    "15 even levels, stochastic (seed 0)": lambda: uniform_sr_lion(seed=0),
    "15 even levels, stochastic (seed 1)": lambda: uniform_sr_lion(seed=1),
}


def figure(paths: dict[str, np.ndarray], out: pathlib.Path):
  from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend, no global state

  fig = Figure(figsize=(10, 4))
  plane, dist = fig.subplots(1, 2)
  gx, gy = np.meshgrid(np.linspace(-0.2, 1.2, 200), np.linspace(-0.2, 1.2, 200))
  loss = 100.0 * (gy - gx**2) ** 2 + (1.0 - gx) ** 2
  plane.contour(gx, gy, np.log10(loss + 1e-3), levels=20, colors="0.8", linewidths=0.6)
  for (name, xs), color, z in zip(paths.items(), ("black", "tab:blue", "tab:red"), (3, 2, 1)):   # float32 on top
    plane.plot(xs[:, 0], xs[:, 1], lw=1, color=color, zorder=z, label=f"{name}: ({xs[-1, 0]:.3f}, {xs[-1, 1]:.3f})")
    dist.semilogy(np.linalg.norm(xs - 1.0, axis=1), lw=0.8, color=color, zorder=z, label=name)
  plane.plot([1], [1], "k*", ms=8)
  plane.set(xlabel="x", ylabel="y", title="paths from (0, 0); the minimum at (1, 1)")
  dist.set(xlabel="step", ylabel="distance to (1, 1)", title="lr 1e-2, weight decay 1e-4")
  for ax in (plane, dist):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--figure", action="store_true", help=f"write {FIGURE}")
  parser.add_argument("--four-bit", action="store_true", help="add the 4-bit and stochastic runs")
  args = parser.parse_args()
  runs = {**RUNS, **(FOUR_BIT_RUNS if args.four_bit else {})}
  paths = {name: path(make(), args.steps) for name, make in runs.items()}
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; Rosenbrock from (0, 0), {args.steps} steps")
  for name, xs in paths.items():
    distance = np.linalg.norm(xs - 1.0, axis=1)
    after = args.steps // 5
    print(f"{name:38s} final ({xs[-1, 0]:.4f}, {xs[-1, 1]:.4f})  distance to (1, 1): final {distance[-1]:.4f}, "
          f"median after step {after} {np.median(distance[after:]):.4f}; "
          f"steps in a two-step cycle after it {cycling(xs)[after:].mean():.1%}")
  if args.figure:
    figure({name: paths[name] for name in RUNS}, FIGURE)
    print(f"wrote {FIGURE}")


if __name__ == "__main__":
  main()
