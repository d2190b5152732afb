"""``python -m optax8``: what is installed and which backend runs where."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform as _platform

import jax

import optax8
from optax8.dispatch import backends
from optax8.kernels import native


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def report() -> dict:
  """The diagnostics as a JSON-serializable dict."""
  info = native.build_info() or {}
  cuda_info = info.get("cuda", {})
  libs = {p: native.library(p) for p in native.PLATFORMS}
  runtime_api = native.runtime_ffi_api()
  try:
    devices = sorted({d.platform for d in jax.devices()})
  except RuntimeError:
    devices = []
  return {
      "version": optax8.__version__,
      "python": _platform.python_version(),
      "jax_version": jax.__version__,
      "jaxlib_version": _version("jaxlib"),
      "ffi_api_built": info.get("ffi_api"),
      "ffi_headers_jaxlib": info.get("ffi_headers_jaxlib"),
      "ffi_api_runtime": list(runtime_api) if runtime_api else None,
      "devices": devices,
      "backends": backends(),
      "cpu_library": libs["cpu"].path,
      "cpu_reason": libs["cpu"].reason or None,
      "cuda_library": libs["cuda"].path,
      "cuda_architectures": cuda_info.get("architectures") or None,
      "cuda_compiler": cuda_info.get("compiler_version") or None,
      "cuda_reason": libs["cuda"].reason or None,
  }


def format_report(r: dict) -> str:
  def api(v):
    return "unknown" if not v else f"{v[0]}.{v[1]}"

  lines = [
      f"optax8 {r['version']}  (python {r['python']}, jax {r['jax_version']}, jaxlib {r['jaxlib_version']})",
      f"XLA FFI API: library built with {api(r['ffi_api_built'])} (jaxlib {r['ffi_headers_jaxlib']} headers), "
      f"runtime has {api(r['ffi_api_runtime'])}",
      f"devices: {', '.join(r['devices']) or 'none'}",
      "backends:",
  ]
  for p, b in r["backends"].items():
    lines.append(f"  {p:5s} {b}")
  for platform, name in (("cpu", "CPU"), ("cuda", "CUDA")):
    if r[f"{platform}_library"]:
      extra = (f" (architectures {r['cuda_architectures']}, nvcc {r['cuda_compiler']})"
               if platform == "cuda" else "")
      lines.append(f"{name} library: {r[f'{platform}_library']}{extra}")
    if r[f"{platform}_reason"]:
      lines.append(f"{name} backend: pure JAX ({r[f'{platform}_reason']})")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m optax8", description=__doc__)
  parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
  args = parser.parse_args(argv)
  r = report()
  print(format_report(r))
  if args.json:
    print(json.dumps(r, sort_keys=True))
  return 0
