"""xent-jax: train, compare and report cross-entropy loss variants from a YAML config.

Examples:
  xent-jax run configs/digits_quick.yaml train.num_steps=100 loss.name=focal
  xent-jax run configs/digits_quick.yaml loss.name=my_pkg.losses:my_loss
  xent-jax compare configs/mnist1d_label_noise.yaml
  xent-jax report runs/mnist1d_label_noise
  xent-jax losses

Overrides are key.sub=value pairs of the config schema (xent_jax/train/config.py); an unknown key
is answered with the closest known ones.
"""

import argparse
import errno
import logging
import os
import pathlib
import re
import sys

EXAMPLES = {
  "run": "examples:\n"
  "  xent-jax run configs/digits_quick.yaml\n"
  "  xent-jax run configs/digits_quick.yaml loss.name=focal loss.hparams.gamma=1.0\n"
  "  xent-jax run configs/digits_quick.yaml loss.name=my_pkg.losses:my_loss --workdir /tmp/a",
  "compare": "examples:\n"
  "  xent-jax compare configs/digits_quick.yaml\n"
  "  xent-jax compare configs/mnist1d_label_noise.yaml 'compare.seeds=[0]'\n"
  "  xent-jax compare configs/digits_label_noise.yaml --sequential",
  "report": "example:\n  xent-jax report runs/digits_quick",
  "losses": "example:\n  xent-jax losses",
}
WORKDIR_HELP = {
  "run": "output directory (default: <config workdir>-run/<loss label>/seed_<seed>, so that "
  "single runs never mix with a comparison)",
  "compare": "output directory (default: the config's workdir, e.g. runs/<name>)",
}


def _command(sub, name: str, text: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The subcommand ``name``: ``text`` as its help and description, its examples as the epilog."""
  return sub.add_parser(
    name,
    help=text,
    description=text,
    parents=[common],
    epilog=EXAMPLES[name],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )


def _parser() -> argparse.ArgumentParser:
  doc = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(
    prog="xent-jax",
    description=doc[0],
    epilog="\n\n".join(doc[1:]),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
    "--debug",
    action="store_true",
    help="on an error, show the Python traceback instead of the one-line message",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name, text in (
    (
      "run",
      "train one model with the config's loss (loss.name, cross_entropy "
      "when the config names none)",
    ),
    ("compare", "run the config's grid of loss variants x seeds, then report"),
  ):
    cmd = _command(sub, name, text, common)
    cmd.add_argument("config", help="YAML config file (see configs/)")
    cmd.add_argument(
      "overrides", nargs="*", help="key.sub=value overrides of the config, e.g. train.num_steps=100"
    )
    cmd.add_argument("--workdir", help=WORKDIR_HELP[name])
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmd.add_argument(
      "--distributed",
      action="store_true",
      help="multi-host: call jax.distributed.initialize() first (auto-detected on "
      "Cloud TPU, SLURM, Open MPI; else give the three options below)",
    )
    cmd.add_argument("--coordinator", help="with --distributed: address HOST:PORT of process 0")
    cmd.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    cmd.add_argument("--process-id", type=int, help="with --distributed: this process's index")
    if name == "compare":
      _group_options(cmd)
  report = _command(
    sub, "report", "rebuild table.md, table.csv and plots/ from a comparison's files", common
  )
  report.add_argument(
    "directory",
    help="a comparison's output directory, holding <variant>/seed_<n>/ "
    "run directories (e.g. runs/digits_quick)",
  )
  _command(
    sub, "losses", "list the registered losses with their hyper-parameters and defaults", common
  )
  return parser


def _group_options(cmd: argparse.ArgumentParser) -> None:
  """``compare``'s choice of how runs train (the config's ``compare.group_*`` keys)."""
  how = cmd.add_mutually_exclusive_group()
  how.add_argument(
    "--sequential",
    action="store_true",
    help="train one run after another, each its own program (compare.group_mode=sequential)",
  )
  how.add_argument(
    "--group-mode",
    choices=("auto", "vmap", "map"),
    help="how a group of runs that share shapes trains: vmap (members vectorized, for GPU/TPU), "
    "map (members one after another inside one program, for CPU) or auto (map on CPU, vmap "
    "elsewhere; the default)",
  )
  cmd.add_argument(
    "--group-memory-mb",
    type=int,
    help="device memory one vectorized group may take (default 2048); larger groups are split",
  )
  cmd.add_argument(
    "--lanes",
    type=int,
    help="groups trained at once, one thread each (compare.lanes; default: one per CPU core "
    "in map mode on CPU, 1 elsewhere)",
  )


def _group_overrides(args: argparse.Namespace) -> list[str]:
  """The config overrides of `_group_options`' flags."""
  if args.command != "compare":
    return []
  overrides = ["compare.group_mode=sequential"] if args.sequential else []
  if args.group_mode:
    overrides.append(f"compare.group_mode={args.group_mode}")
  if args.group_memory_mb is not None:
    overrides.append(f"compare.group_memory_mb={args.group_memory_mb}")
  if args.lanes is not None:
    overrides.append(f"compare.lanes={args.lanes}")
  return overrides


def _print_losses() -> None:
  """Every registered loss: name, one-line summary, hyper-parameters with their defaults."""
  import xent_jax  # pylint: disable=import-outside-toplevel

  infos = xent_jax.list_losses()
  width = max(map(len, infos))
  for name, info in infos.items():
    hparams = ", ".join(f"{key}={value!r}" for key, value in info.hparams.items()) or "none"
    summary = re.sub(r"(:\w+:)?`+([^`]*)`+", r"\2", info.summary)  # reST roles, quotes, TeX
    summary = re.sub(r"\\(\w+)", r"\1", summary)
    print(f"{name:<{width}}  {summary}\n{'':<{width}}  hyper-parameters: {hparams}")
  print(
    "\nA config names one as loss.name (hyper-parameters under loss.hparams), or any loss "
    "function by import path: loss.name=my_pkg.losses:my_loss. One taking (logits, labels, "
    "<hyper-parameters>) and none of the conventions returns per-example values; the harness "
    "then applies where/ignore_index (zero weight), class_weight[label] and the reduction."
  )


def run_workdir(config) -> str:
  """Where ``run`` writes when no workdir is given: ``<workdir>-run/<loss label>/seed_<seed>``."""
  from xent_jax.train.config import loss_label  # pylint: disable=import-outside-toplevel

  return f"{config.workdir.rstrip('/')}-run/{loss_label(config.loss)}/seed_{config.train.seed}"


def main(argv: list[str] | None = None) -> int:
  """Entry point of the console script; returns the exit status.

  Every failure prints one line ``xent-jax: error: <what>`` naming the file or config key and
  exits non-zero: 2 for a config or run-directory mistake, 1 for anything else (a NaN loss, a
  checkpoint that cannot be read, a full disk, ...). ``--debug`` shows the traceback instead.
  """
  parser = _parser()
  # Overrides may come before or after the options, so the leftovers of an option are overrides too.
  args, extra = parser.parse_known_args(argv)
  if extra and (args.command == "report" or any(a.startswith("-") for a in extra)):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  debug = getattr(args, "debug", False)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  # With the `tpu` extra installed on a host without TPU chips, libtpu prints three lines of
  # warnings when JAX starts; this names a placeholder host for it (nothing where chips are).
  from xent_jax.tools.libtpu import quiet_libtpu  # pylint: disable=import-outside-toplevel

  quiet_libtpu()
  if not debug:
    # When a checkpoint write fails, orbax's writer threads log it with tracebacks (absl), asyncio
    # logs the futures they abandon, and tensorstore's callbacks meet a closed event loop (an
    # unraisable exception each): the error itself reaches `main` and is reported once, below.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
  try:
    return _main(args, extra)
  except KeyboardInterrupt:
    print("xent-jax: interrupted", file=sys.stderr)
    return 130
  except Exception as err:  # pylint: disable=broad-except
    if debug:
      raise
    message, status = _describe(err, distributed=getattr(args, "distributed", False))
    print(f"xent-jax: error: {' '.join(message.split())}", file=sys.stderr)
    if getattr(args, "distributed", False):
      _leave(status)
    return status


def _leave(status: int) -> None:
  """Ends this process of a multi-host run now, with ``status``.

  A normal exit would first wait at the JAX coordination service's shutdown barrier for the
  other processes (up to 5 minutes, then every process is aborted with the service's messages),
  while they wait at their next collective for this one. Leaving at once makes that collective
  fail, so the others stop within seconds, each with its own one-line error.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access


# What a collective reports when a process at the other end of it has died or left.
_LOST_PEER = re.compile(r"Connection (reset|closed) by peer|Gloo \w+ failed")


def _describe(err: Exception, distributed: bool = False) -> tuple[str, int]:
  """The one-line message and exit status of an error (``distributed``: of a multi-host run)."""
  # Imported here so that `xent-jax --help` answers without loading JAX.
  from xent_jax.train import checkpoint, config, data, logs, trainer  # pylint: disable=import-outside-toplevel

  lost = [link for link in _chain(err) if _LOST_PEER.search(str(link))]  # innermost last
  if distributed and lost:
    import jax  # pylint: disable=import-outside-toplevel

    text = str(lost[-1]).strip().splitlines()[0]
    message = (
      f"another process of this {jax.process_count()}-process run died or stopped (its own "
      f"output or the job scheduler's says why), so process {jax.process_index()} stops too: {text}"
    )
    return message, 1
  if isinstance(err, (config.ConfigError, data.DataError, logs.RunDirectoryError)):
    return str(err), 2
  if isinstance(err, (trainer.NonFiniteLossError, checkpoint.CheckpointError, logs.LogFileError)):
    return str(err), 1
  if isinstance(err, OSError) and err.strerror and err.errno is not None:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror} (errno {errno.errorcode.get(err.errno, err.errno)})", 1
  return f"{type(err).__name__}: {err} (rerun with --debug for the traceback)", 1


def _chain(err: BaseException):
  """``err`` and the exceptions it was raised from or during."""
  while err is not None:
    yield err
    err = err.__cause__ or err.__context__


def _main(args: argparse.Namespace, extra: list[str]) -> int:
  """Runs the parsed command; its errors go up to `main`."""
  # Imported here so that `xent-jax --help` answers without loading JAX.
  from xent_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from xent_jax.train.report import build_report  # pylint: disable=import-outside-toplevel

  if args.command == "losses":
    _print_losses()
    return 0
  if args.command == "report":
    table = build_report(args.directory)
    if not table:
      print(f"xent-jax: error: no finished runs under {args.directory}", file=sys.stderr)
      return 1
    print(f"wrote {args.directory}/table.md, table.csv and plots/ for {len(table)} variants")
    return 0

  if args.distributed:
    import jax  # pylint: disable=import-outside-toplevel

    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  overrides = list(args.overrides) + extra + ([f"workdir={args.workdir}"] if args.workdir else [])
  overrides += _group_overrides(args)
  # Like `python -m`, look for a loss named by import path (loss.name=my_losses:my_loss) in the
  # working directory first; a console script's sys.path starts at its own bin/ directory.
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  config = config_lib.load_config(args.config, tuple(overrides))
  if args.command == "run" and not any(item.startswith("workdir=") for item in overrides):
    config.workdir = run_workdir(config)
  from xent_jax.train.compare import run_comparison  # pylint: disable=import-outside-toplevel
  from xent_jax.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel

  if args.command == "compare":
    failures = run_comparison(config, progress=not args.no_progress)
    print(f"wrote {config.workdir}/table.md, table.csv and plots/")
    return 1 if failures else 0
  from xent_jax.train.logs import read_summary  # pylint: disable=import-outside-toplevel

  finished = pathlib.Path(config.workdir).is_dir() and read_summary(pathlib.Path(config.workdir))
  summary = train_and_evaluate(config, config.workdir, progress=not args.no_progress)
  if finished:  # train_and_evaluate checked that it is a run of this same config
    print(
      f"reusing the finished run in {config.workdir} (same config; nothing was trained): "
      "for a fresh run, pass a new --workdir"
    )
  final = summary["final"]
  print(
    f"{config.name} seed={config.train.seed}: accuracy={final['eval/accuracy']:.4f} "
    f"nll={final['eval/nll']:.4f} ece={final['eval/ece']:.4f} brier={final['eval/brier']:.4f} "
    f"-> {config.workdir}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
