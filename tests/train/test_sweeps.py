"""Vectorized sweeps: grouping, the member step, and members equal to their sequential runs.

A vectorized member must equal the run ``--sequential`` makes of the same config: the same seed
gives the same data order, label noise and initial weights, so its accuracy may differ by at most
one test example and its NLL by 1e-5 relative, at every logged step and in the summary.
"""

import dataclasses
import gc
import math
import pathlib
import shutil
import weakref

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xent_jax import cli
from xent_jax.train import compare, load_config, logs
from xent_jax.train.compare import run_comparison, run_dir
from xent_jax.train.config import expand_grid
from xent_jax.train.data import load_dataset, train_batch
from xent_jax.train.grouping import Group, plan_groups, split_group
from xent_jax.train.members import graph_of, initial_states, model_and_optimizer
from xent_jax.train.steps import make_member_step, make_objective, make_train_step, over_members
from xent_jax.train.sweep import GroupPrograms, choose_mode

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
NOISE = str(ROOT / "configs" / "digits_label_noise.yaml")
TEST_EXAMPLES = 359  # the digits test split
# Eight runs in two groups (one per loss) of two label-noise rates x two learning rates.
TINY = (
  "model.hidden_dims=[16]",
  "train.batch_size=32",
  "train.eval_batch_size=128",
  "train.num_steps=20",
  "train.eval_every=10",
  "train.checkpoint_every=10",
  "compare.seeds=[0]",
  "compare.grid={data.label_noise: [0.0, 0.3], optim.learning_rate: [0.003, 0.01]}",
  "compare.variants=[{name: focal, hparams: {gamma: 2.0}}, "
  "{name: cross_entropy, hparams: {label_smoothing: 0.1}}]",
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("figures_not_drawn")]


def _config(workdir, *overrides):
  return load_config(QUICK, TINY + (f"workdir={workdir}",) + overrides)


def test_groups_share_shapes_and_split_on_everything_else():
  runs = expand_grid(load_config(NOISE))
  groups = plan_groups(runs)
  assert [len(g.runs) for g in groups] == [6] * 7  # 7 losses, each over 3 seeds x 2 noise rates
  assert {len({r.loss.name + str(r.loss.hparams) for r in g.runs}) for g in groups} == {1}
  assert all(g.traced == () for g in groups)  # seeds and noise: only data and init differ
  # A hyper-parameter set in one run and left out of another (cross-entropy and its smoothed
  # variant) splits them: a traced 0 is not bitwise the static program, and a member must equal
  # its sequential run (at 1000 steps the NLL drifted 8e-4 apart).
  # Loss hyper-parameter values and learning rates join one group as traced values; another
  # loss function, batch size or an untraceable learning rate (optax's warm-up cosine reads it
  # in Python) makes another group.
  overrides = (
    "compare.seeds=[0]",
    "compare.grid={optim.learning_rate: [0.001, 0.01], train.batch_size: [32, 64]}",
    "compare.variants=[{name: focal, hparams: {gamma: 1.0}}, {name: focal, hparams: "
    "{gamma: 2.0}}, {name: cross_entropy}]",
  )
  groups = plan_groups(expand_grid(load_config(QUICK, overrides)))
  assert sorted((len(g.runs), g.traced) for g in groups) == [
    (2, ("optim.learning_rate",)),
    (2, ("optim.learning_rate",)),
    (4, ("optim.learning_rate", "loss.hparams.gamma")),
    (4, ("optim.learning_rate", "loss.hparams.gamma")),
  ]
  warmup = load_config(QUICK, (*overrides, "optim.schedule=warmup_cosine", "optim.warmup_steps=5"))
  assert sorted(len(g.runs) for g in plan_groups(expand_grid(warmup))) == [1] * 4 + [2] * 4


def test_kept_initialisation_holds_the_data_shapes_not_its_arrays():
  """`initial_states` keeps its compiled program for later groups; the program must not keep the
  first group's data set alive (it closed over the whole data set before)."""
  config = load_config(QUICK, ("model.hidden_dims=[7]",))  # a key no other test makes
  data = load_dataset(config.data)
  state = initial_states(config, data, [0, 1], None)
  again = initial_states(config, data, [0, 1], None)  # the kept program: the same weights
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, again))
  kept = weakref.ref(data.x_train_NxF)
  del data
  gc.collect()
  assert kept() is None


def test_map_member_is_its_sequential_run_bit_for_bit():
  """Under ``map`` a member's step compiles as the sequential step does: a 1-D CNN's loss and
  weights equal the sequential run's bit for bit, also while its neighbour is masked. (With a
  ``jnp.where`` mask instead of a conditional the weights parted after two steps, and at the
  MNIST-1D paper's protocol that grew to whole test examples.)"""
  config = load_config(
    QUICK,
    (
      "model.name=mnist1d_cnn",
      "model.conv=im2col",
      "optim.name=adam",
      "optim.schedule=constant",
      "optim.learning_rate=0.01",
    ),
  )
  data = load_dataset(config.data)
  graphdef = graph_of(config, data)
  state = initial_states(config, data, [0, 1], None)
  alone = jax.tree.map(lambda a: jnp.array(a[0]), state)
  alone_step = make_train_step(graphdef, make_objective(config.loss))
  step = jax.jit(over_members(make_member_step(graphdef, config, ()), "map", (0,) * 5))
  for t in range(4):
    batches = [train_batch(data, seed=s, step=t, batch_size=32) for s in (0, 1)]
    x, y = (jnp.stack(column) for column in zip(*batches))
    alone, alone_loss, _ = alone_step(alone, *batches[0])
    state, loss, _ = step(state, {}, x, y, jnp.array([True, t % 2 == 0]))
    assert loss[0] == alone_loss
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a[0], b),
    nnx.to_pure_dict(state),
    nnx.to_pure_dict(alone),
  )


def test_groups_of_one_model_share_its_programs():
  """Groups that differ only in their loss share the model's evaluation and logits programs (so
  compile them once); each has its own train step."""
  groups = plan_groups(expand_grid(load_config(NOISE)))  # cross_entropy, ..., focal, ...
  first, second = GroupPrograms(groups[0], "map"), GroupPrograms(groups[2], "map")
  assert (first.runs[0].loss.name, second.runs[0].loss.name) == ("cross_entropy", "focal")
  assert first.eval_step is second.eval_step and first.logits_step is second.logits_step
  assert first.train_step is not second.train_step


def test_split_group_makes_near_equal_parts_within_the_bound():
  group = Group(tuple(range(7)), ())
  for bound, sizes in ((7, [7]), (100, [7]), (3, [3, 2, 2]), (1, [1] * 7), (0, [1] * 7)):
    assert [len(part.runs) for part in split_group(group, bound)] == sizes
  assert [r for part in split_group(group, 3) for r in part.runs] == list(range(7))


def test_group_mode_rule():
  assert choose_mode("auto", "cpu") == "map"
  assert choose_mode("auto", "gpu") == choose_mode("auto", "tpu") == "vmap"
  assert choose_mode("vmap", "cpu") == "vmap" and choose_mode("map", "gpu") == "map"
  with pytest.raises(ValueError, match="group mode must be one of"):
    choose_mode("grouped")


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_member_step_equals_each_sequential_step(mode):
  """Two members with their own seed, batch, focal gamma and learning rate, stepped together,
  equal the sequential step of each (initial weights included)."""
  base = load_config(QUICK, ("model.hidden_dims=[8]", "loss.name=focal", "loss.hparams.gamma=2.0"))
  data = load_dataset(base.data)
  members = [(0, 1.0, 0.003), (5, 3.0, 0.03)]
  runs = [
    dataclasses.replace(
      base,
      train=dataclasses.replace(base.train, seed=seed),
      loss=dataclasses.replace(base.loss, hparams={"gamma": gamma}),
      optim=dataclasses.replace(base.optim, learning_rate=lr),
    )
    for seed, gamma, lr in members
  ]
  graphdef = graph_of(base, data)
  state = initial_states(base, data, [seed for seed, _, _ in members], None)
  values = {
    "loss.hparams.gamma": jnp.array([g for _, g, _ in members]),
    "optim.learning_rate": jnp.array([lr for _, _, lr in members]),
  }
  batches = [train_batch(data, seed=s, step=3, batch_size=16) for s, _, _ in members]
  x, y = (jnp.stack(column) for column in zip(*batches))
  traced = ("optim.learning_rate", "loss.hparams.gamma")
  step = jax.jit(over_members(make_member_step(graphdef, base, traced), mode, (0,) * 5))
  new, loss, finite = step(state, values, x, y, jnp.array([True, True]))
  assert finite.tolist() == [True, True]
  for m, run in enumerate(runs):
    model = nnx.jit(
      lambda run=run: model_and_optimizer(run, data, jax.random.key(run.train.seed))
    )()
    alone_graph, alone = nnx.split(model)
    alone_step = make_train_step(alone_graph, make_objective(run.loss))
    first = nnx.to_pure_dict(alone)
    jax.tree.map(  # the same initial weights
      lambda a, b, m=m: np.testing.assert_array_equal(a[m], b), nnx.to_pure_dict(state), first
    )
    alone, alone_loss, _ = alone_step(alone, *batches[m])
    np.testing.assert_allclose(loss[m], alone_loss, rtol=1e-6)
    jax.tree.map(
      lambda a, b, m=m: np.testing.assert_allclose(a[m], b, rtol=1e-5, atol=1e-7),
      nnx.to_pure_dict(new),
      nnx.to_pure_dict(alone),
    )
  # An inactive member keeps its state bit for bit.
  frozen, _, _ = step(
    initial_states(base, data, [0, 5], None), values, x, y, jnp.array([True, False])
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a[1], b[1]),
    nnx.to_pure_dict(frozen),
    nnx.to_pure_dict(initial_states(base, data, [0, 5], None)),
  )


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, worker_id):
  """The eight runs of `TINY`, one after another on one device (today's path).

  Trained once per test session: the xdist workers share the session's temporary directory, and
  the first worker to need the runs trains them under a file lock while the others wait, then
  read them (every test copies what it changes).
  """
  base = tmp_path_factory.getbasetemp()
  session = base if worker_id == "master" else base.parent  # per session, seen by every worker
  workdir, done = session / "sweeps_sequential", session / "sweeps_sequential.done"
  with filelock.FileLock(session / "sweeps_sequential.lock"):
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a worker that failed here left a partial one
      config = _config(workdir, "compare.group_mode=sequential")
      assert run_comparison(config, progress=False, devices=jax.devices()[:1]) == []
      done.touch()
  return workdir


def _assert_members_equal(workdir: pathlib.Path, reference: pathlib.Path, runs) -> None:
  """Every run's logged rows and summary within one test example and 1e-5 relative NLL."""
  for run in runs:
    got, want = run_dir(workdir, run), run_dir(reference, run)
    rows, ref_rows = logs.read_metrics(got), logs.read_metrics(want)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [10, 20]
    pairs = [
      *zip(rows, ref_rows),
      (logs.read_summary(got)["final"], logs.read_summary(want)["final"]),
    ]
    for row, ref in pairs:
      assert abs(row["eval/accuracy"] - ref["eval/accuracy"]) * TEST_EXAMPLES <= 1 + 1e-9
      np.testing.assert_allclose(row["eval/nll"], ref["eval/nll"], rtol=1e-5)
    for row, ref in zip(rows, ref_rows):
      np.testing.assert_allclose(row["train/loss"], ref["train/loss"], rtol=1e-5)
    summary = logs.read_summary(got)
    assert summary["seed"] == run.train.seed and summary["group"] == run.name
    assert _recorded(got) == _recorded(want)
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["10", "20"]


def _recorded(directory: pathlib.Path) -> list[str]:
  """The lines of a run's ``config.yaml`` but its ``workdir`` (where the comparison lives)."""
  text = (directory / "config.yaml").read_text()
  return [line for line in text.splitlines() if not line.startswith("workdir:")]


@pytest.mark.parametrize("mode", ["map", "vmap"])
def test_vectorized_members_equal_their_sequential_runs(tmp_path, sequential, mode):
  """Under map the two groups are cut into two lanes each (four parts, two at a time)."""
  lanes = "compare.lanes=2" if mode == "map" else "compare.lanes=1"
  config = _config(tmp_path, f"compare.group_mode={mode}", lanes)
  assert run_comparison(config, progress=False, devices=jax.devices()[:1]) == []
  _assert_members_equal(tmp_path, sequential, expand_grid(config))
  assert (tmp_path / "table.md").exists()


def test_members_sharded_over_devices_equal_their_sequential_runs(tmp_path, sequential):
  """Four members on 8 devices: a (4 members x 2 data) mesh, each member's batch on its row."""
  overrides = (
    "compare.grid={data.label_noise: [0.0, 0.3], optim.learning_rate: [0.003, 0.01]}",
    "compare.variants=[{name: focal, hparams: {gamma: 2.0}}]",
  )
  config = _config(tmp_path, "compare.group_mode=vmap", *overrides)
  runs = expand_grid(config)
  (group,) = plan_groups(runs)
  programs = GroupPrograms(group, "vmap", jax.devices())
  assert dict(programs.mesh.shape) == {"members": 4, "data": 2}
  x, _ = programs.batch(0)
  rows = programs.mesh.devices
  for shard in x.addressable_shards:
    member = shard.index[0].start
    assert shard.data.shape[0] == 1 and shard.device in rows[member].tolist()
  assert run_comparison(config, progress=False, devices=jax.devices()) == []
  _assert_members_equal(tmp_path, sequential, runs)
  assert logs.read_summary(run_dir(tmp_path, runs[0]))["num_devices"] == 2


def test_a_diverging_member_is_reported_and_the_others_finish(tmp_path):
  """One member's learning rate blows up: it fails with the sequential run's message, its
  checkpoints before the failure stay, and the other member finishes."""
  overrides = (
    "compare.seeds=[0]",
    "compare.grid={data.label_noise: [0.0], optim.learning_rate: [0.003, 1.0e+30]}",
    "compare.variants=[{name: focal, hparams: {gamma: 2.0}}]",
  )
  config = _config(tmp_path / "group", "compare.group_mode=map", *overrides)
  failures = run_comparison(config, progress=False, devices=jax.devices()[:1])
  good, bad = expand_grid(config)
  assert logs.read_summary(run_dir(tmp_path / "group", good))["completed"]
  assert logs.read_summary(run_dir(tmp_path / "group", bad)) is None
  alone = _config(tmp_path / "alone", "compare.group_mode=sequential", *overrides)
  expected = run_comparison(alone, progress=False, devices=jax.devices()[:1])
  assert len(failures) == len(expected) == 1
  assert failures[0] == expected[0].replace(str(tmp_path / "alone"), str(tmp_path / "group"))
  assert "became non-finite at step" in failures[0]
  assert math.isfinite(logs.read_metrics(run_dir(tmp_path / "group", good))[-1]["eval/nll"])


@pytest.mark.parametrize(
  "flags, mode, budget, lanes",
  [
    ([], "auto", 2048, 0),
    (["--sequential"], "sequential", 2048, 0),
    (["--group-mode", "vmap", "--group-memory-mb", "64"], "vmap", 64, 0),
    (["--group-mode", "map", "--lanes", "3"], "map", 2048, 3),
  ],
)
def test_compare_flags_choose_how_groups_run(monkeypatch, flags, mode, budget, lanes):
  seen = {}
  monkeypatch.setattr(
    compare, "run_comparison", lambda config, **_: seen.update(compare=config.compare) or []
  )
  assert cli.main(["compare", QUICK, "--no-progress", *flags]) == 0
  compare_config = seen["compare"]
  assert (compare_config.group_mode, compare_config.group_memory_mb) == (mode, budget)
  assert compare_config.lanes == lanes


def test_sequential_and_group_mode_exclude_each_other(capsys):
  with pytest.raises(SystemExit):
    cli.main(["compare", QUICK, "--sequential", "--group-mode", "map"])
  assert "not allowed with argument" in capsys.readouterr().err


def test_sequential_checkpoints_resume_in_a_group(tmp_path, sequential):
  """Runs left by ``--sequential`` before their summaries, half of them back at step 10, finish
  as one group: each member resumes from its own checkpoint (the same format), the members at
  20 wait for the others, and every run equals its uninterrupted sequential run."""
  workdir = tmp_path / "compare"
  shutil.copytree(sequential, workdir)
  config = _config(workdir, "compare.group_mode=map")
  runs = expand_grid(config)
  for index, run in enumerate(runs):
    directory = run_dir(workdir, run)
    (directory / logs.SUMMARY_FILE).unlink()
    if index % 2:
      shutil.move(directory / "checkpoints" / "20", tmp_path / f"aside_{index}")
  assert run_comparison(config, progress=False, devices=jax.devices()[:1]) == []
  _assert_members_equal(workdir, sequential, runs)
