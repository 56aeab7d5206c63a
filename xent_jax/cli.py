"""The ``xent-jax`` command: ``run``, ``compare`` and ``report``.

Examples::

  xent-jax run configs/digits_quick.yaml train.num_steps=100 loss.name=focal
  xent-jax compare configs/digits_quick.yaml
  xent-jax report runs/digits_quick
"""

import argparse
import errno
import logging
import sys


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="xent-jax", description=__doc__.splitlines()[0])
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true",
                      help="on an error, show the Python traceback instead of the one-line message")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, text in (("run", "train one model with the config's loss"),
                     ("compare", "run the config's grid of loss variants x seeds, then report")):
    cmd = sub.add_parser(name, help=text, parents=[common])
    cmd.add_argument("config", help="YAML config file (see configs/)")
    cmd.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    cmd.add_argument("--workdir", help="output directory (default: the config's workdir)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmd.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (auto-detected on "
                          "Cloud TPU, SLURM, Open MPI; else give the three options below)")
    cmd.add_argument("--coordinator", help="with --distributed: address HOST:PORT of process 0")
    cmd.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    cmd.add_argument("--process-id", type=int, help="with --distributed: this process's index")
  report = sub.add_parser("report", help="rebuild table.md, table.csv and plots/ from a comparison's files",
                          parents=[common])
  report.add_argument("directory")
  return parser


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
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    return _main(args, extra)
  except KeyboardInterrupt:
    print("xent-jax: interrupted", file=sys.stderr)
    return 130
  except Exception as err:  # pylint: disable=broad-except
    if getattr(args, "debug", False):
      raise
    message, status = _describe(err)
    print(f"xent-jax: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _describe(err: Exception) -> tuple[str, int]:
  """The one-line message and exit status of an error."""
  # Imported here so that `xent-jax --help` answers without loading JAX.
  from xent_jax.train import checkpoint, config, logs, trainer  # pylint: disable=import-outside-toplevel

  if isinstance(err, (config.ConfigError, logs.RunDirectoryError)):
    return str(err), 2
  if isinstance(err, (trainer.NonFiniteLossError, checkpoint.CheckpointError, logs.LogFileError)):
    return str(err), 1
  if isinstance(err, OSError) and err.strerror:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror} (errno {errno.errorcode.get(err.errno, err.errno)})", 1
  return f"{type(err).__name__}: {err} (rerun with --debug for the traceback)", 1


def _main(args: argparse.Namespace, extra: list[str]) -> int:
  """Runs the parsed command; its errors go up to `main`."""
  # Imported here so that `xent-jax --help` answers without loading JAX.
  from xent_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from xent_jax.train.report import build_report  # pylint: disable=import-outside-toplevel

  if args.command == "report":
    table = build_report(args.directory)
    if not table:
      print(f"xent-jax: error: no finished runs under {args.directory}", file=sys.stderr)
      return 1
    print(f"wrote {args.directory}/table.md, table.csv and plots/ for {len(table)} variants")
    return 0

  if args.distributed:
    import jax  # pylint: disable=import-outside-toplevel

    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  overrides = list(args.overrides) + extra + ([f"workdir={args.workdir}"] if args.workdir else [])
  config = config_lib.load_config(args.config, tuple(overrides))
  from xent_jax.train.compare import run_comparison  # pylint: disable=import-outside-toplevel
  from xent_jax.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel

  if args.command == "compare":
    failures = run_comparison(config, progress=not args.no_progress)
    print(f"wrote {config.workdir}/table.md, table.csv and plots/")
    return 1 if failures else 0
  summary = train_and_evaluate(config, config.workdir, progress=not args.no_progress)
  final = summary["final"]
  print(f"{config.name} seed={config.train.seed}: accuracy={final['eval/accuracy']:.4f} "
        f"nll={final['eval/nll']:.4f} ece={final['eval/ece']:.4f} brier={final['eval/brier']:.4f} "
        f"-> {config.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
