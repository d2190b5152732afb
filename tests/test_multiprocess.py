"""Two processes x 4 CPU devices (jax.distributed, gloo) train as one process x 8 devices, bit for bit, and an
orbax checkpoint written by two processes restores in two and in one (tests/multiprocess_worker.py)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(num_processes: int, out: pathlib.Path) -> None:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(num_processes), str(i), str(port), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, output) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} of {num_processes} failed:\n{output[-4000:]}"
    assert f"process {i} of {num_processes}: ok" in output


def test_two_processes_train_as_one_and_share_checkpoints(tmp_path):
  _run(2, tmp_path)   # trains, saves the state with orbax, restores it in two processes
  _run(1, tmp_path)   # trains on one process's 8 devices, restores the two processes' checkpoint
  two, one = np.load(tmp_path / "result_2.npz"), np.load(tmp_path / "result_1.npz")
  assert len(two.files) == len(one.files) == 3 + 1 + 2 * 3 * 2   # params; count; codes and absmax of mu, nu
  for name in one.files:
    assert two[name].dtype == one[name].dtype and two[name].shape == one[name].shape
    np.testing.assert_array_equal(two[name], one[name], err_msg=name)
