"""mkdocs hook: writes the API reference from ``optax8.__all__``.

The line ``<!-- optax8-api -->`` in a page becomes one section per defining
module (titled by the first line of its docstring) with a ``:::`` entry per
public name, so a name added to ``__all__`` shows up with no edit to the docs;
the Flax submodules (``optax8.linen``, ``optax8.nnx``) follow with their own
``__all__``, then the names outside the package's namespace that the guides
use (``EXTRA``: moving trees to and from host memory, adding an optimizer).
Entries use the defining path (``optax8.quantize.quantize``): the package's
own ``optax8.quantize`` would name the submodule.
"""

from __future__ import annotations

import importlib
import inspect

MARKER = "<!-- optax8-api -->"
EXTRA = {   # module: names, imported from their module (docs/offload.md, docs/adding_an_optimizer.md)
    "optax8.offload": ["to_host", "to_device"],
    "optax8.fused": ["fused", "Rule", "Options"],
    "optax8.options": ["check_hyperparameters"],
    "optax8.optimizers": ["register", "REGISTRY"],
    "optax8.kernels.algorithms": ["Algorithm", "Hyper", "register"],
}


def _entries() -> dict[str, list[str]]:
  optax8 = importlib.import_module("optax8")
  sections: dict[str, list[str]] = {}
  for name in sorted(optax8.__all__, key=str.lower):
    obj = getattr(optax8, name)
    module = getattr(obj, "__module__", None) if inspect.isclass(obj) or inspect.isfunction(obj) else None
    path = f"{module}.{obj.__qualname__}" if module and module.startswith("optax8") else f"optax8.{name}"
    sections.setdefault(module or "optax8", []).append(path)
  for sub in optax8._SUBMODULES:   # the Flax layers: optax8.linen, optax8.nnx
    module = importlib.import_module(f"optax8.{sub}")
    sections[module.__name__] = [f"{module.__name__}.{name}" for name in module.__all__]
  for module, names in EXTRA.items():
    loaded = importlib.import_module(module)
    missing = [name for name in names if not hasattr(loaded, name)]
    if missing:
      raise AttributeError(f"docs/api_hook.py: {module} has no {', '.join(missing)}")
    sections.setdefault(module, []).extend(f"{module}.{name}" for name in names)
  return sections


def _title(module: str) -> str:
  doc = inspect.getdoc(importlib.import_module(module)) or module
  return doc.splitlines()[0].rstrip(".")


def on_page_markdown(markdown: str, **kwargs) -> str:
  if MARKER not in markdown:
    return markdown
  out = []
  for module, paths in sorted(_entries().items(), key=lambda kv: (kv[0] == "optax8", kv[0])):
    out.append(f"## {_title(module) if module != 'optax8' else 'Constants'}\n\n`{module}`\n")
    out.extend(f"::: {path}\n" for path in paths)
  return markdown.replace(MARKER, "\n".join(out))
