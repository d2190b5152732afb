"""One process of tests/test_multiprocess.py: FSDP training with adamw8bit on 8 CPU devices in all.

Run as ``python multiprocess_worker.py NUM_PROCESSES PROCESS_ID PORT OUT_DIR``. Every process builds the
same global params from the same host arrays; the step is jitted over a mesh of all processes' devices.
Process 0 writes the gathered params and state to OUT_DIR/result_{NUM_PROCESSES}.npz; with two processes
the state is also saved with orbax to OUT_DIR/ckpt and restored; with one, that checkpoint is restored.
"""

import os
import sys

num_processes, process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
  jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import optax8  # noqa: E402

assert jax.process_count() == num_processes and jax.device_count() == 8
mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
host_params = {"w1": rng.standard_normal((128, 1024)).astype(np.float32),   # 16 rows a device
               "w2": rng.standard_normal((256, 512)).astype(np.float32),
               "b": rng.standard_normal((512,)).astype(np.float32)}
target = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), host_params)
spec = lambda x: P("fsdp") if x.ndim == 2 else P()   # FSDP: the rows of every matrix


def put(x, spec):
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])


params = jax.tree.map(lambda x: put(x, spec(x)), host_params)
target = jax.tree.map(lambda x: put(x, spec(x)), target)
tx = optax8.adamw8bit(1e-2, weight_decay=1e-2, min_8bit_size=0)
state = tx.init(params)


def loss_fn(params, target):   # elementwise gradients: the same numbers on any mesh
  return sum(jax.numpy.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target)))


@jax.jit
def train_step(params, state, target):
  loss, grads = jax.value_and_grad(loss_fn)(params, target)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


for _ in range(3):
  params, state, loss = train_step(params, state, target)
for x in jax.tree.leaves(state[1:]):   # every state leaf stays split over all 8 devices (rows), none gathered
  assert x.ndim == 1 or x.sharding.spec == P("fsdp"), x.sharding

gathered = lambda tree: [np.asarray(x) for x in multihost_utils.process_allgather(jax.tree.leaves(tree), tiled=True)]
result = gathered((params, state))
if process_id == 0:
  np.savez(os.path.join(out, f"result_{num_processes}.npz"), *result)

abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
ckpt = os.path.join(out, "ckpt")
with ocp.StandardCheckpointer() as checkpointer:
  if num_processes > 1:
    checkpointer.save(ckpt, state)
    checkpointer.wait_until_finished()
  optax8.check_state(checkpointer.metadata(ckpt).item_metadata, abstract)
  restored = checkpointer.restore(ckpt, abstract)
for a, b in zip(gathered(restored), gathered(state)):
  np.testing.assert_array_equal(a, b)
print(f"process {process_id} of {num_processes}: ok, loss {float(loss):.6g}")
