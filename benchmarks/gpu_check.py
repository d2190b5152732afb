"""One-call GPU check: tests, sanitizers and step times on one NVIDIA GPU.

Runs from a source checkout with the prebuilt libraries in ``optax8/_lib``
(nothing is compiled) and writes everything under ``--out``:

1. the card, driver and versions, and ``python -m optax8 --json``;
2. the GPU-marked tests (``tests/test_cuda.py``), then a selection of the
   suite with the GPU as JAX's default device (every optimizer against
   optax, through the CUDA handlers);
3. compute-sanitizer memcheck and racecheck on ``gpu_kernels_once.py``
   (every handler once, checked against the CPU handler);
4. step times (``step_time.py``): adamw8bit's update and apply paths
   against optax.adamw and a plain copy of the same bytes, one tensor per
   leaf and 500 leaves, stochastic rounding, 4-bit states, all nine optimizers, bfloat16 params, and
   bitsandbytes' AdamW8bit and torch's fused AdamW where installed;
5. with ``--ncu``, Nsight Compute's view of one fused AdamW step launch;
6. ``gpu_check.json``: all of it, one object, and ``logs.txt``: every log.

Each stage has a time limit and a failing stage does not stop the others;
the tests and sanitizers run side by side, the benchmarks one at a time.

    python benchmarks/gpu_check.py --out /tmp/gpu_check [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Test modules that also run with the GPU as the default device: the whole
# optimizers (grouped leaves, apply_gradients, options) through the CUDA step.
GPU_DEFAULT_TESTS = ["tests/test_alias.py", "tests/test_transforms.py", "tests/test_apply.py", "tests/test_inputs.py"]


def start(name: str, cmd: list[str], out: pathlib.Path, env=None):
  """Starts cmd with its output in out/name.log."""
  print(f"=== {name}: {' '.join(cmd)}", flush=True)
  f = open(out / f"{name}.log", "w")
  proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
  return dict(name=name, proc=proc, file=f, start=time.time())


def finish(job, out: pathlib.Path, limit: float) -> dict:
  """Waits for a started job until ``limit`` seconds after its start; returns rc, seconds and its output's tail."""
  try:
    rc = job["proc"].wait(timeout=max(1.0, limit - (time.time() - job["start"])))
  except subprocess.TimeoutExpired:
    job["proc"].kill()
    job["proc"].wait()
    rc = "timeout"
  job["file"].close()
  text = (out / f"{job['name']}.log").read_text(errors="replace")
  seconds = round(time.time() - job["start"], 1)
  last = text.strip().splitlines()[-1] if text.strip() else ""
  print(f"--- {job['name']}: rc={rc} in {seconds}s; {last[:200]}", flush=True)
  return dict(rc=rc, seconds=seconds, tail=text[-4000:])


def run(name: str, cmd: list[str], out: pathlib.Path, limit: float, env=None) -> dict:
  return finish(start(name, cmd, out, env), out, limit)


def pytest_summary(text: str) -> dict:
  counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", text)}
  failed = re.findall(r"^FAILED (\S+)", text, re.M)
  return dict(counts=counts, failed=failed[:50])


def step_json(text: str) -> dict:
  rows = re.search(r"^JSON (.*)$", text, re.M)
  extra = re.search(r"^JSON_EXTRA (.*)$", text, re.M)
  return dict(rows=json.loads(rows.group(1)) if rows else None, extra=json.loads(extra.group(1)) if extra else None)


def save(out: pathlib.Path, result: dict):
  (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))


def machine() -> dict:
  info = {}
  smi = shutil.which("nvidia-smi")
  if smi:
    q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                        "--format=csv,noheader"], capture_output=True, text=True)
    info["nvidia_smi"] = q.stdout.strip()
  d = subprocess.run([sys.executable, "-m", "optax8", "--json"], capture_output=True, text=True, cwd=ROOT)
  try:
    info["optax8"] = json.loads(d.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    info["optax8"] = d.stdout[-2000:] + d.stderr[-2000:]
  v = subprocess.run([sys.executable, "-c", "import jax, optax, flax, torch; print(jax.__version__, optax.__version__,"
                      " flax.__version__, torch.__version__)"], capture_output=True, text=True)
  info["versions(jax optax flax torch)"] = v.stdout.strip() or v.stderr[-500:]
  info["date"] = time.strftime("%Y-%m-%d")
  return info


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
  ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer stages")
  ap.add_argument("--test-limit", type=float, default=200, help="seconds for the tests and sanitizers")
  ap.add_argument("--cases", default="", help="comma list of the step-time cases to run (default: all)")
  ap.add_argument("--gpu-default-tests", default=",".join(GPU_DEFAULT_TESTS),
                  help="test modules to run with the GPU as the default device")
  ap.add_argument("--ncu", action="store_true", help="profile one step launch with Nsight Compute")
  ap.add_argument("--bench-limit", type=float, default=100, help="seconds for each benchmark")
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  py = sys.executable
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  os.environ.update(env)
  result = dict(machine=machine())
  print(json.dumps(result["machine"], indent=1), flush=True)

  # Correctness stages run side by side (they share the GPU, not the timings).
  jobs = [start("tests_gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "4", "-m", "gpu", "tests/"],
                out)]
  if not args.quick:
    jobs.append(start("tests_gpu_default", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "6", "-m",
                                            "not gpu", "-rf", *args.gpu_default_tests.split(",")], out))
  sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
  if os.path.exists(sanitizer):
    for tool in ("memcheck", "racecheck"):
      jobs.append(start(f"sanitizer_{tool}", [sanitizer, "--tool", tool, "--kernel-name", "kns=_kernel",
                                              "--error-exitcode", "3", py, "benchmarks/gpu_kernels_once.py"], out,
                        env={"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}))
  else:
    result["sanitizer"] = "compute-sanitizer not found"
  for job in jobs:
    t = finish(job, out, args.test_limit)
    if job["name"].startswith("tests"):
      t.update(pytest_summary(t["tail"]))
    else:
      m = re.search(r"ERROR SUMMARY: (\d+) error", t["tail"])
      t["errors"] = int(m.group(1)) if m else None
    result[job["name"]] = t
  save(out, result)

  big = 1 << (24 if args.quick else 27)
  cases = [("adamw_16_leaves", ["--params", str(big), "--leaves", "16", "--optimizers", "adamw", "--bnb"]),
           ("adamw_500_leaves", ["--params", str(500 * (big // 500 // 1024) * 1024), "--leaves", "500",
                                 "--optimizers", "adamw"]),
           ("adamw_1_leaf", ["--params", str(500 * (big // 500 // 1024) * 1024), "--leaves", "1",
                             "--optimizers", "adamw"]),
           ("adamw_stochastic", ["--params", str(big), "--leaves", "16", "--optimizers", "adamw,lion",
                                 "--rounding", "stochastic"]),
           ("adamw_4bit", ["--params", str(big), "--leaves", "16", "--optimizers", "adamw,lion", "--bits", "4"])]
  if not args.quick:
    cases += [("all_16_leaves", ["--params", str(big // 4), "--leaves", "16", "--optimizers", "all"]),
              ("adamw_bf16", ["--params", str(big), "--leaves", "16", "--optimizers", "adamw", "--dtype", "bfloat16"]),
              ("adamw_bf16_stochastic", ["--params", str(big), "--leaves", "16", "--optimizers", "adamw", "--dtype",
                                         "bfloat16", "--param-rounding", "stochastic"]),
              ("adamw_mlp", ["--mlp", "4096", "--leaves", "8", "--batch", "256", "--optimizers", "adamw"])]
  if args.cases:
    cases = [c for c in cases if c[0] in args.cases.split(",")]
  for name, extra in cases:
    t = run(f"step_{name}", [py, "benchmarks/step_time.py", "--repeats", "10", "--chain", "5", *extra], out,
            args.bench_limit)
    result[f"step_{name}"] = {**t, **step_json(t["tail"])}
    save(out, result)
  if not args.cases or "quantize" in args.cases.split(","):
    t = run("quantize_throughput", [py, "benchmarks/quantize_throughput.py", "--elements", str(big), "--platforms",
                                    "cuda"], out, args.bench_limit)
    result["quantize_throughput"] = t
  ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
  if args.ncu and os.path.exists(ncu):   # one launch of the fused AdamW step, 16.8M params
    t = run("ncu", [ncu, "--clock-control", "none", "--kernel-name", "regex:step_", "--launch-count", "1",
                    "--section", "SpeedOfLight", "--section", "Occupancy", "--section", "LaunchStats",
                    "--section", "MemoryWorkloadAnalysis", py, "benchmarks/step_time.py", "--params", str(1 << 24),
                    "--leaves", "1", "--optimizers", "adamw", "--repeats", "1"], out, args.bench_limit)
    result["ncu"] = t
  save(out, result)
  with open(out / "logs.txt", "w") as f:   # one file: what comes back from a device call is limited in number
    for log in sorted(out.glob("*.log")):
      f.write(f"===== {log.name}\n{log.read_text(errors='replace')}\n")
      log.unlink()
  print("\n=== summary")
  for k, v in result.items():
    if isinstance(v, dict) and "rc" in v:
      print(f"{k:28s} rc={v['rc']} {v['seconds']}s {v.get('counts', '')} {v.get('errors', '')}")
  for k, v in result.items():
    if k.startswith("step_") and v.get("rows"):
      for r in v["rows"]:
        print(f"{k:20s} {r['optimizer']:9s} optax {r['ns_optax']:.4f} update {r['ns_optax8_update']:.4f} "
              f"({r['ratio_update']:.2f}x) apply {r['ns_optax8_apply']:.4f} ({r['ratio_apply']:.2f}x) ns/param; "
              f"copy {v['extra']['copy_ns']:.4f}")


if __name__ == "__main__":
  main()
