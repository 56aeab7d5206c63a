"""The README's Python snippets run as written, in order, and print what the README says they do.

Every ```python block of README.md is executed in one namespace (a block may use what an earlier
block defined). A ```text block that directly follows a Python block is that block's expected
standard output, compared exactly. The guides' examples (docs/guides/) are run by the
documentation's doctest build (tests/test_docs.py).
"""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def readme_snippets() -> list[tuple[int, str, str | None]]:
  """``(line, code, expected_output or None)`` for each Python block, in order."""
  text = README.read_text()
  blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in _FENCE.finditer(text)]
  snippets = []
  for i, (lang, body, start, end) in enumerate(blocks):
    if lang != "python":
      continue
    expected = None
    if i + 1 < len(blocks):
      next_lang, next_body, next_start, _ = blocks[i + 1]
      if next_lang == "text" and not text[end:next_start].strip():
        expected = next_body
    snippets.append((text.count("\n", 0, start) + 1, body, expected))
  return snippets


def test_the_readme_has_python_snippets_with_outputs():
  """The front page's tour: every Python block says what it prints."""
  snippets = readme_snippets()
  assert len(snippets) >= 2
  assert all(expected is not None for _, _, expected in snippets)


@pytest.mark.slow
def test_readme_snippets_run_in_order_and_print_what_they_say(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  namespace: dict = {"__name__": "readme"}
  for line, code, expected in readme_snippets():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # pylint: disable=exec-used
      except Exception as err:  # pylint: disable=broad-except
        pytest.fail(f"README.md snippet at line {line} raised {type(err).__name__}: {err}")
    if expected is not None:
      assert out.getvalue() == expected, f"README.md snippet at line {line} printed otherwise"
