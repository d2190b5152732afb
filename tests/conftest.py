import os

# Multi-device tests run on 8 CPU devices; the flag must be set before jax initializes.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import hypothesis
import jax
import pytest

hypothesis.settings.register_profile("default", deadline=None, max_examples=40, print_blob=True)
hypothesis.settings.register_profile("ci", deadline=None, max_examples=80, print_blob=True, derandomize=True)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
