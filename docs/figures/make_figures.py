"""Draws the figures of docs/concepts.md from optax8 itself.

    python docs/figures/make_figures.py      # (needs matplotlib) writes maps.png and error.png here

- ``maps.png``: the 256 values of the signed and the unsigned dynamic map
  (``optax8.dynamic_map``), linear and by magnitude on a log scale.
- ``error.png``: the relative round-trip error of one element,
  ``|dequantize(quantize(x)) - x| / absmax``, against ``x / absmax``, for both maps,
  next to the error of linear (absmax) int8 quantization; and the relative error
  of a whole Adam-like moment tensor against the block size.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend, no global state

import optax8

HERE = pathlib.Path(__file__).parent


def maps_figure(path: pathlib.Path):
  fig = Figure(figsize=(10, 3.8))
  lin, log = fig.subplots(1, 2)
  for kind, color in ((optax8.SIGNED, "tab:blue"), (optax8.UNSIGNED, "tab:orange")):
    values = optax8.dynamic_map(kind)
    lin.plot(np.arange(256), values, ".", ms=3, color=color, label=f"{kind}")
    positive = values[values > 0]
    log.semilogy(np.arange(len(positive)), positive, ".", ms=3, color=color, label=f"{kind}: {len(positive)} > 0")
  lin.set(xlabel="code", ylabel="value (times the block's absmax)", title="dynamic maps")
  log.set(xlabel="rank among the positive values", ylabel="value", title="positive values, log scale")
  for ax in (lin, log):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def roundtrip(x: np.ndarray, kind: str, block_size: int = optax8.DEFAULT_BLOCK_SIZE) -> np.ndarray:
  return np.asarray(optax8.dequantize(optax8.quantize(jnp.asarray(x), block_size=block_size, kind=kind)))


def error_figure(path: pathlib.Path):
  fig = Figure(figsize=(10, 3.8))
  elem, blocks = fig.subplots(1, 2)
  # One block per row: the row's last element is 1, so absmax = 1 and x is its own normalized value.
  v = np.logspace(-7, 0, 4095, dtype=np.float32)
  rows = np.stack([v, np.ones_like(v)], axis=1)
  for kind, color in ((optax8.SIGNED, "tab:blue"), (optax8.UNSIGNED, "tab:orange")):
    err = np.abs(roundtrip(rows, kind, block_size=2)[:, 0] - v) / v
    elem.loglog(v, np.maximum(err, 1e-9), lw=0.8, color=color, label=f"dynamic, {kind}")
  linear = np.abs(np.round(v * 127) / 127 - v) / v
  elem.loglog(v, np.maximum(linear, 1e-9), lw=0.8, color="tab:gray", label="linear int8 (x * 127 / absmax)")
  elem.set(xlabel="|x| / absmax", ylabel="relative error of x", ylim=(1e-5, 2), title="one element")

  key_m, key_v = jax.random.split(jax.random.key(0))
  m = 1e-3 * jax.random.t(key_m, 3.0, (1024, 4096))  # heavy-tailed, like first moments
  nu = (1e-2 * jax.random.t(key_v, 3.0, (1024, 4096))) ** 2  # like second moments
  sizes = [64, 128, 256, 512, 1024, 2048, 4096]
  for x, kind, color in ((m, optax8.SIGNED, "tab:blue"), (nu, optax8.UNSIGNED, "tab:orange")):
    rel = [float(jnp.linalg.norm(roundtrip(x, kind, b) - x) / jnp.linalg.norm(x)) for b in sizes]
    blocks.semilogx(sizes, rel, "o-", color=color, label=f"{kind} map: {'m' if kind == optax8.SIGNED else 'v'}")
  blocks.set_xticks(sizes, [str(b) for b in sizes])
  blocks.set(xlabel="block size", ylabel="||x' - x|| / ||x||", title="heavy-tailed 1024 x 4096 tensor")
  for ax in (elem, blocks):
    ax.grid(alpha=0.3, which="both")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  maps_figure(HERE / "maps.png")
  error_figure(HERE / "error.png")
  print("wrote", HERE / "maps.png", HERE / "error.png")


if __name__ == "__main__":
  main()
