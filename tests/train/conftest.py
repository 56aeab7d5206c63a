"""Fixtures shared by the training harness's tests."""

import pytest

from xent_jax.train import plots


@pytest.fixture
def figures_not_drawn(monkeypatch):
  """For tests whose subject is training, resuming or grouping rather than the report: the report
  writes its tables but not its three figures.

  Drawing the figures took 1-10 s of each comparison these tests run (66 s of the suite's
  in-process time); ``test_report.py``, ``test_cli.py``, the paper configs and the own-loss
  comparison still draw them and check what they show.
  """
  monkeypatch.setattr(plots, "draw_all", lambda path, groups, table, title: None)
