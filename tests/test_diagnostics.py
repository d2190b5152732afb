import json
import subprocess
import sys

from optax8 import diagnostics


def test_json_report_on_the_last_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "optax8", "--json"], capture_output=True, text=True, timeout=300,
                     cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  report = json.loads(lines[-1])
  for key in ("version", "jax_version", "backends", "cuda_library", "ffi_api_built", "ffi_api_runtime"):
    assert key in report
  assert set(report["backends"]) >= {"cpu", "cuda"}
  assert set(report["backends"].values()) <= {"native", "jax"}
  assert "backends:" in r.stdout and "CUDA" in r.stdout


def test_text_report_names_each_platform():
  text = diagnostics.format_report(diagnostics.report())
  for platform in ("cpu", "cuda", "tpu"):
    assert f"  {platform}" in text
