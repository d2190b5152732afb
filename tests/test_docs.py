"""Every python block of README.md and docs/*.md runs as a reader pastes it.

A page's blocks run top to bottom in one fresh interpreter (one namespace,
the working directory a new folder, 8 CPU devices as in the sharding
pages). A block preceded by ``<!-- docs: skip REASON -->`` is not run; the
skipped blocks are listed with their reasons, and each needs a reason.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs:\s*skip\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)")


def blocks(page: pathlib.Path):
  """``(line, language, code, skip reason or None)`` of each fenced block of a page."""
  lines = page.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    start, language = i + 1, m.group(1)
    j = i + 1
    while not lines[j].startswith("```"):
      j += 1
    previous = lines[i - 1] if i > 0 else ""
    skip = SKIP.search(previous)
    out.append((start, language, "\n".join(lines[i + 1:j]) + "\n", skip.group(1) if skip else None))
    i = j + 1
  return out


def runnable(page):
  return [(line, code) for line, language, code, skip in blocks(page) if language == "python" and skip is None]


RUNNABLE = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_every_python_block_of_the_page_runs(page, tmp_path):
  script = ["import sys", "__ns = {'__name__': '__main__'}"]
  for line, code in runnable(page):
    script.append(f"print('--- {page.name}:{line}', flush=True)")
    script.append(f"exec(compile({code!r}, {f'{page.name}:{line}'!r}, 'exec'), __ns)")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", MPLBACKEND="Agg")
  r = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                     timeout=600, env=env)
  assert r.returncode == 0, f"{page.name}: a block failed after {r.stdout[-1500:]}\n{r.stderr[-4000:]}"


def test_skipped_blocks_say_why():
  skipped = [(p.name, line, reason) for p in PAGES for line, language, _, reason in blocks(p)
             if language == "python" and reason is not None]
  for name, line, reason in skipped:
    print(f"skipped {name}:{line}: {reason}")
    assert reason, f"{name}:{line}: a skipped block needs a reason"
  # every JAX block of the docs runs but the PyTorch sides of comparisons
  assert all("PyTorch" in reason for _, _, reason in skipped), skipped


def test_docstrings_use_markdown_cross_references():
  """The API page is mkdocstrings (Markdown): Sphinx roles such as :func:`x` would show as literal text."""
  role = re.compile(r":(func|class|mod|data|meth|attr|obj):`")
  found = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "optax8").rglob("*.py"))
           for n, line in enumerate(path.read_text().splitlines(), 1) if role.search(line)]
  assert not found, found
