"""The ``public-api`` directive: a module's reference page, generated from its ``__all__``.

``.. public-api:: xent_jax.metrics`` documents every name in ``xent_jax.metrics.__all__`` with
autodoc, grouped under a heading per defining module (:data:`SECTIONS`), each group opened by an
autosummary table. A name added to ``__all__`` appears on the next build without editing the
docs: one whose module has no heading here goes under "Other". A name re-exported from another
public namespace (the optax drop-ins at the top level) gets an index entry that points to its
home page, so its docstring is rendered once.
"""

import importlib
import inspect
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# Defining module -> section title, in page order. Modules sharing a title share a section.
SECTIONS = {
  "xent_jax.losses.cross_entropy": "Cross-entropy on logits",
  "xent_jax.core.labels": "Cross-entropy on logits",
  "xent_jax.losses.variants": "Loss variants",
  "xent_jax.losses.bitempered": "Loss variants",
  "xent_jax.registry": "Losses by name: the registry",
  "xent_jax.fused.linear": "Fused linear cross-entropy",
  "xent_jax.parallel.logits": "Vocabulary-parallel losses",
  "xent_jax.parallel.linear": "Vocabulary-parallel losses",
  "xent_jax.metrics._classification": "Classification metrics",
  "xent_jax.metrics._calibration": "Calibration metrics",
  "xent_jax.metrics._temperature": "Temperature scaling",
  "xent_jax.metrics._streaming": "Streaming evaluation sums",
}
# Namespaces with a page of their own: names they define are rendered there.
HOMES = {"xent_jax.optax_compat": "optax drop-ins", "xent_jax.metrics": "Metrics"}
OTHER = "Other"


def _entries(module_name: str) -> list[tuple[str, str, object]]:
  """``(section, name, object)`` for each name of the module's ``__all__``, in page order."""
  module = importlib.import_module(module_name)
  titles = list(dict.fromkeys(SECTIONS.values())) + [*HOMES.values(), OTHER]
  rows = []
  for name in module.__all__:
    obj = getattr(module, name)
    if isinstance(obj, types.ModuleType):
      section = "Namespaces"
    else:
      home = obj.__module__
      section = HOMES[home] if home in HOMES and home != module_name else SECTIONS.get(home, OTHER)
    rows.append((section, name, obj))
  order = {title: i for i, title in enumerate([*titles, "Namespaces"])}
  return sorted(rows, key=lambda row: order[row[0]])


def _signature(obj: object) -> str:
  try:
    return str(inspect.signature(obj))
  except (TypeError, ValueError):
    return "(...)"


def _rst(module_name: str) -> list[str]:
  """The reST that documents ``module_name.__all__``."""
  lines = [f".. currentmodule:: {module_name}", ""]
  sections: dict[str, list[tuple[str, object]]] = {}
  for section, name, obj in _entries(module_name):
    sections.setdefault(section, []).append((name, obj))
  for section, members in sections.items():
    lines += [section, "-" * len(section), ""]
    if section == "Namespaces":
      for _, obj in members:
        summary = (inspect.getdoc(obj) or "").splitlines()[0]
        lines += [f"* :mod:`{obj.__name__}`: {summary}"]
      lines.append("")
      continue
    lines += [".. autosummary::", ""] + [f"   {name}" for name, _ in members] + [""]
    for name, obj in members:
      home = obj.__module__
      if home in HOMES and home != module_name:
        directive = "py:class" if inspect.isclass(obj) else "py:function"
        lines += [
          f".. {directive}:: {name}{_signature(obj)}",
          "",
          f"   Re-exported from :mod:`{home}`: see :obj:`{home}.{name}`.",
          "",
        ]
      elif inspect.isclass(obj):
        lines += [f".. autoclass:: {name}", ""]
      else:
        lines += [f".. autofunction:: {name}", ""]
  return lines


class PublicApi(SphinxDirective):
  """``.. public-api:: package.module``: the module's ``__all__``, documented."""

  required_arguments = 1

  def run(self) -> list[nodes.Node]:
    module_name = self.arguments[0]
    self.env.note_dependency(importlib.import_module(module_name).__file__)
    container = nodes.section()
    container.document = self.state.document
    source = StringList(_rst(module_name), source=f"<public-api {module_name}>")
    nested_parse_with_titles(self.state, source, container)
    return container.children


def setup(app):
  app.add_directive("public-api", PublicApi)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
