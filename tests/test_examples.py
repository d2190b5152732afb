"""The examples run as a user runs them (a subprocess) and print their RESULT line."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import load_script

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def run_script(path, *args: str, cwd) -> str:
  """The standard output of a script run as a user runs it; it must exit with 0."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
  r = subprocess.run([sys.executable, str(path), *args], check=False, capture_output=True, text=True,
                     timeout=600, cwd=cwd, env=env)
  assert r.returncode == 0, r.stderr[-4000:]
  return r.stdout


def run_example(name: str, *args: str, cwd) -> dict:
  out = run_script(EXAMPLES / name, *args, cwd=cwd)
  last = out.strip().splitlines()[-1]
  assert last.startswith("RESULT "), out[-2000:]
  return json.loads(last.removeprefix("RESULT "))


def load_example(name: str):
  return load_script(EXAMPLES / name)


def test_quickstart_trains_both_and_prints_its_result(tmp_path):
  plot = tmp_path / "curves.png"
  result = run_example("quickstart.py", "--steps", "12", "--plot", str(plot), cwd=tmp_path)
  for key in ("loss_32bit", "loss_8bit", "state_bytes_32bit", "state_bytes_8bit"):
    assert key in result
  assert math.isfinite(result["loss_32bit"]) and math.isfinite(result["loss_8bit"])
  # 12 steps already leave the uniform-guess loss (ln 256 = 5.55) well behind, for both.
  assert result["loss_32bit"] < 0.8 * result["initial_loss"] and result["loss_8bit"] < 0.8 * result["initial_loss"]
  assert abs(result["loss_8bit"] - result["loss_32bit"]) <= 0.02 * result["loss_32bit"]
  assert result["state_bytes_8bit"] <= 0.3 * result["state_bytes_32bit"]
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["adam", "adamw", "lion", "sgd", "rmsprop", "adagrad", "lamb", "lars", "ademamix"])
def test_quickstart_optimizers_quantize_the_model_state(name):
  """Every ``--optimizer`` choice pairs optax with optax8 and keeps the 8-bit state at most 0.3x."""
  from flax import nnx

  quickstart = load_example("quickstart.py")
  _, params = nnx.split(nnx.eval_shape(lambda: quickstart.LanguageModel(rngs=nnx.Rngs(0))))
  tx32, tx8 = quickstart.make_optimizers(name, steps=100)
  bytes32 = quickstart.state_bytes(jax.eval_shape(tx32.init, params))
  bytes8 = quickstart.state_bytes(jax.eval_shape(tx8.init, params))
  assert bytes8 <= 0.3 * bytes32, (name, bytes8, bytes32)


def test_linen_trainstate_resumes_identically(tmp_path):
  result = run_example("linen_trainstate.py", "--steps", "16", "--checkpoint-dir", str(tmp_path), cwd=tmp_path)
  assert result["identical"] is True
  assert result["checkpoint_step"] == 8 and result["quantized_leaves"] > 0
  assert result["loss_resumed"] == result["loss_uninterrupted"] < result["initial_loss"]
  assert result["state_bytes_8bit"] <= 0.3 * result["state_bytes_32bit"]


def test_offload_keeps_the_state_on_the_host(tmp_path):
  result = run_example("offload.py", cwd=tmp_path)
  assert result["init_memory_kinds"] == result["state_memory_kinds"] == ["pinned_host"]
  assert result["identical_to_device_state"]
  assert result["state_bytes"] <= 0.52 * result["param_bytes"]   # two 8-bit moments: about 2 bytes per parameter
  assert result["losses"][-1] < 0.5 * result["losses"][0]


def test_sharded_fsdp_keeps_the_state_on_its_shards(tmp_path):
  result = run_example("sharded_fsdp.py", cwd=tmp_path)   # sets up 8 CPU devices itself
  assert result["devices"] == 8
  assert not result["state_all_gathered"] and not result["codes_moved"]
  # Each device holds an eighth of the state (to within the replicated step count).
  assert result["state_bytes_per_device"] <= result["state_bytes"] / 8 + 64
  assert result["state_specs"] == ["P('fsdp', None)", "P('fsdp',)"]
  assert result["loss_last"] < 0.1 * result["loss_first"]


def test_per_leaf_bits(tmp_path):
  result = run_example("per_leaf_bits.py", "--steps", "15", cwd=tmp_path)
  state = result["state"]
  assert state["embed/stable_embedding"]["bits"] == 32 and state["embed/stable_embedding"]["bytes_per_param"] == 8
  assert state["head/kernel"]["bits"] == 32 and state["head/kernel"]["bytes_per_param"] == 8
  assert state["hidden/kernel"]["bits"] == 8 and abs(state["hidden/kernel"]["bytes_per_param"] - 2.0312) < 1e-3
  assert result["loss_last"] < 0.8 * result["loss_first"]


def test_lm_convergence_benchmark_runs_every_storage_and_draws_its_figure(tmp_path):
  """benchmarks/lm_convergence.py (the quickstart's model under each state and params storage), a few steps."""
  figure = tmp_path / "lm.png"
  result = run_example(str(EXAMPLES.parent / "benchmarks" / "lm_convergence.py"), "--steps", "6", "--figure",
                       str(figure), cwd=tmp_path)
  runs = result["runs"]
  assert set(runs) == {"float32", "8bit", "8bit-stochastic", "4bit", "bf16-params", "bf16-params-stochastic"}
  assert all(r["val_loss"] < 0.8 * r["curve"][0] for r in runs.values())   # every run trains
  assert runs["float32"]["bytes_per_param"] == pytest.approx(12.0, abs=1e-3)
  assert runs["4bit"]["bytes_per_param"] < runs["8bit"]["bytes_per_param"] - 0.9
  assert runs["bf16-params-stochastic"]["bytes_per_param"] < 4.1
  assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_with_4_bit_states(tmp_path):
  result = run_example("quickstart.py", "--steps", "12", "--bits", "4", "--plot", str(tmp_path / "q.png"),
                       cwd=tmp_path)
  assert result["bits"] == 4 and result["loss_8bit"] < 0.8 * result["initial_loss"]
  assert abs(result["loss_8bit"] - result["loss_32bit"]) <= 0.05 * result["loss_32bit"]
  assert result["state_bytes_8bit"] <= 0.17 * result["state_bytes_32bit"]   # 1.06 of 8 bytes, and small leaves


def test_step_time_benchmark_prints_its_ratios_and_compile_times(tmp_path):
  """benchmarks/step_time.py (docs/benchmarks.md's step times, and benchmarks/gpu_check.py's) on a small tree:
  one JSON row per optimizer with its step times, ratios and compile times."""
  out = run_script(EXAMPLES.parent / "benchmarks" / "step_time.py", "--params", "65536", "--leaves", "4",
                   "--repeats", "1", "--optimizers", "adamw,lion", cwd=tmp_path)
  rows = json.loads(next(line for line in out.splitlines() if line.startswith("JSON ")).removeprefix("JSON "))
  assert [row["optimizer"] for row in rows] == ["adamw", "lion"]
  for row in rows:
    for key in ("ns_optax", "ns_optax8_update", "ns_optax8_apply", "compile_s_optax", "compile_s_optax8_apply"):
      assert row[key] > 0, (key, row)
    assert row["ratio_apply"] == pytest.approx(row["ns_optax8_apply"] / row["ns_optax"])


def test_bnb_translations_benchmark_runs_every_translation():
  """benchmarks/bnb_translations.py (docs/migrating_from_bitsandbytes.md's table against bitsandbytes): every
  optax8 translation builds and steps its data (bitsandbytes itself is not installed here)."""
  bench = load_script(EXAMPLES.parent / "benchmarks" / "bnb_translations.py")
  p0, grads = bench.data()
  for name, _, make in bench.PAIRS:
    out = bench.run_optax8(make(), p0, grads[:2])
    for k, x in out.items():
      assert np.all(np.isfinite(x)) and not np.array_equal(x, p0[k]), (name, k)
