"""optax8 with FSDP: parameters and 8-bit AdamW state sharded by rows over 8 devices.

A two-layer MLP on a mesh of 8 CPU devices (set below; on a machine with
8 accelerators drop the flag). Every parameter is split by rows, its state
follows it (``tx.init`` on the sharded params), and the jitted, donated
train step runs each optimizer kernel on each device's shards: its
compiled HLO has no all-gather of optimizer state.

    python examples/sharded_fsdp.py
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax8


def loss_fn(params, x, y):
  h = jax.nn.gelu(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def state_bytes_per_device(state):
  """Bytes of the optimizer state held by each device."""
  per_device = {}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return per_device


def main():
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))  # XLA places the gathers
  rows = NamedSharding(mesh, P("fsdp"))          # FSDP: the first axis of every parameter
  replicated = NamedSharding(mesh, P())
  k1, k2, kx = jax.random.split(jax.random.key(0), 3)
  d_in, d_hidden, d_out = 512, 2048, 256
  params = {"w1": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in), "b1": jnp.zeros((d_hidden,)),
            "w2": jax.random.normal(k2, (d_hidden, d_out)) / np.sqrt(d_hidden)}
  params = jax.device_put(params, rows)
  x = jax.device_put(jax.random.normal(kx, (64, d_in)), replicated)
  y = jax.device_put(jnp.sin(x[:, :d_out]), replicated)

  tx = optax8.adamw8bit(1e-3, weight_decay=1e-2)
  state = tx.init(params)   # each state leaf sharded like its parameter, absmax on the same mesh axes
  state_shardings = jax.tree.map(lambda a: a.sharding, state)
  param_shardings = jax.tree.map(lambda a: a.sharding, params)

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     out_shardings=(param_shardings, state_shardings, replicated))
  def train_step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # Gradients sharded like the parameters (FSDP's reduce-scatter): otherwise XLA may pick another layout
    # for a gradient, and the optimizer's state would be resharded to meet it.
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  hlo = train_step.lower(params, state, x, y).compile().as_text()
  gathers = re.findall(r"= (\S+?)(?:\{[^}]*\})? all-gather\(", hlo)   # result types, e.g. f32[512,2048]
  # FSDP gathers the weights for the matmuls; a gather of 8-bit state would produce codes or absmax.
  state_gathered = bool(set(gathers) & _quantized_types(state))
  # Any collective on uint8 data moves codes (the model itself has none).
  codes_moved = bool(re.search(r"= \(?u8\[[^\n]*? (all-gather|all-to-all|collective-permute|all-reduce)\(", hlo))
  print(f"{jax.device_count()} devices, backends {optax8.backends()}")
  print(f"all-gathers in the step: {len(gathers)}, of optimizer state: {'yes' if state_gathered else 'none'}; "
        f"collectives moving 8-bit codes: {'yes' if codes_moved else 'none'}")

  losses = []
  for _ in range(20):
    params, state, loss = train_step(params, state, x, y)
    losses.append(float(loss))
  per_device = state_bytes_per_device(state)
  total = sum(per_device.values())
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
  print(f"optimizer state: {total / 2**20:.2f} MiB in all, {max(per_device.values()) / 2**20:.3f} MiB per device "
        f"(float32 Adam: {8 * n_params / 2**20:.2f} MiB)")
  specs = sorted({str(a.sharding.spec) for a in jax.tree.leaves(state) if a.ndim})
  print("RESULT " + json.dumps({
      "devices": jax.device_count(), "state_all_gathered": state_gathered, "codes_moved": codes_moved,
      "all_gathers": len(gathers), "state_bytes": total, "state_bytes_per_device": max(per_device.values()),
      "params": n_params, "state_specs": specs, "loss_first": losses[0], "loss_last": losses[-1]}))


def _quantized_types(state):
  """HLO types (``u8[512,2048]``, ``f32[512,8]``) of the codes and absmax of the 8-bit state."""
  leaves = jax.tree.leaves(state, is_leaf=lambda a: isinstance(a, optax8.QuantizedArray))
  quantized = [a for q in leaves if isinstance(q, optax8.QuantizedArray) for a in (q.codes, q.absmax)]
  return {f"{'u8' if a.dtype == np.uint8 else 'f32'}[{','.join(map(str, a.shape))}]" for a in quantized}


if __name__ == "__main__":
  main()
