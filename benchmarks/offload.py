"""Cost and saving of host offload: step time and device memory with and without ``optax8.offload``.

Times a donated jitted step ``(params, state, grads) -> (params, state)``
with the state kept on the device and with it offloaded to pinned host
memory (moved in and out inside the step), and prints the ratio. Where the
device reports ``memory_stats()`` (GPUs), it also prints the device bytes
in use between steps in both cases: the difference is the optimizer state.
On the CPU backend both memories are host RAM, so only the time of the
extra copies is measured.

    python benchmarks/offload.py --params 67108864 --optimizer adamw8bit
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax8

OPTIMIZERS = {
    "adamw8bit": lambda: optax8.adamw8bit(1e-3, weight_decay=1e-2),
    "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2),
}


def _shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _bytes_in_use(device) -> int | None:
  stats = device.memory_stats()
  return None if stats is None else int(stats.get("bytes_in_use", 0))


def run(tx, total: int, leaves: int, repeats: int, offloaded: bool) -> dict:
  """Median step seconds and device bytes in use between steps (None where not reported)."""
  device = jax.devices()[0]
  gc.collect()
  before = _bytes_in_use(device)
  cols = 1024
  rows = total // leaves // cols
  params = {f"p{i:03d}": jax.device_put(jnp.full((rows, cols), 0.01 * (i + 1), jnp.float32), device)
            for i in range(leaves)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  if offloaded:
    tx = optax8.offload(tx)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  fn = jax.jit(step, in_shardings=_shardings((params, state, grads)), out_shardings=_shardings((params, state)),
               donate_argnums=(0, 1))
  params, state = jax.block_until_ready(fn(params, state, grads))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(fn(params, state, grads))
    times.append(time.perf_counter() - t0)
  between = _bytes_in_use(device)
  kinds = sorted({x.sharding.memory_kind for x in jax.tree.leaves(state)})
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  del params, state, grads, fn
  gc.collect()
  return {"seconds": float(np.median(times)), "state_memory_kinds": kinds, "state_bytes": state_bytes,
          "device_bytes_between_steps": None if between is None else between - before}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--params", type=int, default=1 << 24)
  ap.add_argument("--leaves", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw8bit")
  args = ap.parse_args()
  device = jax.devices()[0]
  print(f"# jax {jax.__version__} on {device.device_kind} ({device.platform}); {args.optimizer}, "
        f"{args.params} parameters in {args.leaves} leaves")
  plain = run(OPTIMIZERS[args.optimizer](), args.params, args.leaves, args.repeats, offloaded=False)
  off = run(OPTIMIZERS[args.optimizer](), args.params, args.leaves, args.repeats, offloaded=True)
  ratio = off["seconds"] / plain["seconds"]
  print(f"step: device state {plain['seconds'] * 1e3:.2f} ms, offloaded state {off['seconds'] * 1e3:.2f} ms "
        f"(x{ratio:.2f}); state {off['state_bytes'] / 2**20:.1f} MiB in {off['state_memory_kinds']}")
  if plain["device_bytes_between_steps"] is None:
    print(f"{device.platform}: memory_stats() is not available, so device memory is not measured here "
          "(on the CPU backend device and host memory are the same RAM)")
  else:
    saved = plain["device_bytes_between_steps"] - off["device_bytes_between_steps"]
    print(f"device memory between steps: {plain['device_bytes_between_steps'] / 2**20:.1f} MiB with the state on "
          f"the device, {off['device_bytes_between_steps'] / 2**20:.1f} MiB offloaded "
          f"(saves {saved / 2**20:.1f} MiB; state is {off['state_bytes'] / 2**20:.1f} MiB)")
  print("RESULT " + json.dumps({"optimizer": args.optimizer, "params": args.params, "device_kind": device.device_kind,
                                "time_ratio": ratio, "state_on_device": plain, "offloaded": off}))


if __name__ == "__main__":
  main()
