"""A train step with the 8-bit AdamW state offloaded to pinned host memory.

``optax8.offload(tx)`` keeps the optimizer state in host memory between
steps; the jitted step moves it to the device for the update and back. The
step gives every input's and output's sharding (memory kind included) and
donates params and state, so each donated buffer is reused by an output in
the same memory. Trains a small MLP for a few steps next to the same
optimizer without offload, checks that both give the same losses, and
reports where the state lives and its bytes.

    python examples/offload.py
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax8

WIDTH, STEPS = 512, 5


def loss_fn(params, batch):
  x, y = batch
  h = jax.nn.gelu(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def shardings(tree):
  """Each leaf's sharding (device and memory kind): what in_shardings and out_shardings take."""
  return jax.tree.map(lambda x: x.sharding, tree)


def train_step(tx, params, state, batch):
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def jit_offloaded_step(tx, params, state, batch):
  """The donated step; ``state`` is ``tx.init(params)`` (on the host)."""
  # With in_shardings and out_shardings for every argument and result, jit pairs each donated buffer with an
  # output in the same memory: host state with host state, device params with device params.
  loss_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.jit(functools.partial(train_step, tx), in_shardings=shardings((params, state, batch)),
                 out_shardings=(shardings(params), shardings(state), loss_sharding), donate_argnums=(0, 1))


def state_report(state) -> dict:
  by_kind: dict[str, int] = {}
  for x in jax.tree.leaves(state):
    by_kind[x.sharding.memory_kind] = by_kind.get(x.sharding.memory_kind, 0) + x.nbytes
  return by_kind


def main():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (WIDTH, 4 * WIDTH)) / np.sqrt(WIDTH), "b1": jnp.zeros((4 * WIDTH,)),
            "w2": jax.random.normal(k2, (4 * WIDTH, WIDTH)) / np.sqrt(4 * WIDTH), "b2": jnp.zeros((WIDTH,))}
  params = jax.device_put(params, jax.devices()[0])
  x = jax.random.normal(k3, (64, WIDTH))
  batch = jax.device_put((x, jnp.sin(x)), jax.devices()[0])

  base = optax8.adamw8bit(1e-3, weight_decay=1e-2)
  tx = optax8.offload(base)
  state = tx.init(params)   # in pinned_host memory
  before = state_report(state)
  step = jit_offloaded_step(tx, params, state, batch)
  plain_step = jax.jit(functools.partial(train_step, base))
  plain_params, plain_state = params, base.init(params)
  params = jax.tree.map(jnp.copy, params)   # the offloaded run donates its own copy

  losses, plain_losses = [], []
  for _ in range(STEPS):
    params, state, loss = step(params, state, batch)
    plain_params, plain_state, plain_loss = plain_step(plain_params, plain_state, batch)
    losses.append(float(loss))
    plain_losses.append(float(plain_loss))
  after = state_report(state)

  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  state_bytes = sum(after.values())
  same = losses == plain_losses and all(np.array_equal(np.asarray(a), np.asarray(b))
                                        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state)))
  device = jax.devices()[0]
  stats = device.memory_stats()
  print(f"params: {param_bytes / 2**20:.2f} MiB in {sorted({p.sharding.memory_kind for p in jax.tree.leaves(params)})}")
  print(f"optimizer state after init: {before}; after {STEPS} donated steps: {after} "
        f"({state_bytes / 2**20:.2f} MiB, {state_bytes / param_bytes:.3f} x the params)")
  print(f"losses: {' '.join(f'{v:.5f}' for v in losses)}; identical to the state kept on the device: {same}")
  if stats is None:
    print(f"{device.platform}: memory_stats() is not available; on a GPU it shows device memory without the state")
  else:
    print(f"{device.platform} memory in use between steps: {stats.get('bytes_in_use', 0) / 2**20:.2f} MiB")
  print("RESULT " + json.dumps({"state_memory_kinds": sorted(after), "init_memory_kinds": sorted(before),
                                "state_bytes": state_bytes, "param_bytes": param_bytes, "losses": losses,
                                "identical_to_device_state": same, "platform": device.platform}))


if __name__ == "__main__":
  main()
