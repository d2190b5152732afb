import json
import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def test_quickstart_prints_its_result(tmp_path):
  r = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                     timeout=600, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
  assert result["state_bytes_8bit"] <= 0.26 * result["state_bytes_32bit"]
  assert result["rel_error_m"] < 0.02 and result["rel_error_v"] < 0.02


def test_offload_keeps_the_state_on_the_host(tmp_path):
  r = subprocess.run([sys.executable, str(EXAMPLES / "offload.py")], capture_output=True, text=True, timeout=600,
                     cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
  assert result["init_memory_kinds"] == result["state_memory_kinds"] == ["pinned_host"]
  assert result["identical_to_device_state"]
  assert result["state_bytes"] <= 0.52 * result["param_bytes"]   # two 8-bit moments: about 2 bytes per parameter
  assert result["losses"][-1] < 0.5 * result["losses"][0]


def test_sharded_fsdp_keeps_the_state_on_its_shards(tmp_path):
  r = subprocess.run([sys.executable, str(EXAMPLES / "sharded_fsdp.py")], capture_output=True, text=True,
                     timeout=600, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
  assert result["devices"] == 8
  assert not result["state_all_gathered"] and not result["codes_moved"]
  # Each device holds an eighth of the state (to within the replicated step count).
  assert result["state_bytes_per_device"] <= result["state_bytes"] / 8 + 64
  assert result["state_specs"] == ["P('fsdp', None)", "P('fsdp',)"]
  assert result["loss_last"] < 0.1 * result["loss_first"]


def test_per_leaf_bits(tmp_path):
  r = subprocess.run([sys.executable, str(EXAMPLES / "per_leaf_bits.py"), "--steps", "15"], capture_output=True,
                     text=True, timeout=300, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
  state = result["state"]
  assert state["embed/stable_embedding"]["bits"] == 32 and state["embed/stable_embedding"]["bytes_per_param"] == 8
  assert state["head/kernel"]["bits"] == 32 and state["head/kernel"]["bytes_per_param"] == 8
  assert state["hidden/kernel"]["bits"] == 8 and abs(state["hidden/kernel"]["bytes_per_param"] - 2.0312) < 1e-3
  assert result["loss_last"] < 0.8 * result["loss_first"]
