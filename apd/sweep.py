"""Runs a sweep declared in an experiment config: trains and evaluates one run per point, then
writes the table and the plots.

    python -m apd.sweep --config=experiments/NAME.py[:ARGS] --root=DIR [--backend=local]
        [--parallel=N] [--only=RUN ...] [--stage=all|run|table|status]

The config file declares `get_config(arg)` and `get_hyper(hyper)` (see `apd.sweeps.hyper`:
`hyper.product`, `sweep`, `zipit`, `chainit`, `fixed`; keys are config paths such as
`levels.params.delta_max` and `seed`, or `:NAME` for a config argument). Every point is checked
against the real config before anything runs. Each run is its own workdir, DIR/NAME, named from
its overrides (`delta_max=0.25,seed=1`), trained by `python -m apd.train` and evaluated on its
final checkpoint by `python -m apd.evaluate`, with the same config and `--config.KEY=VALUE`
overrides.

Backends:
  local   runs the commands here, one run after another, or --parallel=N runs at a time; the
          logs are DIR/NAME/train.log and DIR/NAME/evaluate.log. The runs inherit the
          environment: on a CPU host export XLA_FLAGS="--xla_force_host_platform_device_count=2
          --xla_cpu_multi_thread_eigen=false" (as launch/quickstart.sh does) and each run splits
          its batch over two host devices, ~1.6x one device on 2 cores.
  slurm   writes DIR/slurm/STAMP/ (the arguments of each array task, the submit command) and
          submits one job array of launch/slurm_gpu.sbatch (--sweep mode: each task trains,
          then evaluates its run); --parallel=N caps the tasks running at once, --slurm_flags
          sets the resources of each task, --dry_run writes everything but does not submit.
  print   prints the commands (for any other scheduler or a TPU queue).

Resumable: a run is finished when the evaluation's results.json of its final step holds every
unit with the current settings; a relaunch skips finished runs, resumes training from the latest
checkpoint and keeps the evaluation units already computed. --archive=DIR keeps a copy of each
finished run's results.json in DIR (RUN.json); a run with a complete copy there is finished even
when its workdir is gone (another machine, a cleaned disk), and the table is built from it.
--only=RUN (a run name or a shell pattern, repeatable) restricts the backends to those runs.

Output in DIR: sweep.json (the points, their commands and states), table.md and table.json
(every metric per point: mean and 95% t-interval over training seeds where the sweep sweeps
`seed`, else mean and std over evaluation seeds; see `apd.sweeps.table`), plots/ (generation
against inpainting FID per mask family, and metrics against each swept key).
"""

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any

from apd import cli
from apd.evaluation import integrity
from apd.sweeps import plan, plots, table

BACKENDS = ("local", "slurm", "print")
STAGES = ("all", "run", "table", "status")
STATE_FILE = "sweep.json"
DEFAULT_SLURM_FLAGS = "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1"
SBATCH_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "slurm_gpu.sbatch"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m apd.sweep",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="experiments/NAME.py[:ARGS]")
    parser.add_argument("--root", required=True, help="directory of the sweep's runs")
    parser.add_argument("--backend", default="local", choices=BACKENDS)
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="local: runs at a time (default 1); slurm: array tasks at a time (default: no cap)",
    )
    parser.add_argument(
        "--only", action="append", default=None, help="a run name or shell pattern (repeatable)"
    )
    parser.add_argument("--stage", default="all", choices=STAGES)
    parser.add_argument(
        "--archive",
        default=None,
        help="directory for a copy of each finished run's results.json (e.g. under version "
        "control); a run with a complete copy there is finished even without its workdir",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Show a user error with its traceback."
    )
    parser.add_argument("--dry_run", action="store_true", help="slurm: write, do not submit")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the commands")
    parser.add_argument(
        "--train_flags", default="", help="extra flags of apd.train (--train_flags='--v=1')"
    )
    parser.add_argument(
        "--evaluate_flags", default="", help="extra flags of apd.evaluate (e.g. --feature_dir=X)"
    )
    parser.add_argument(
        "--slurm_flags", default=DEFAULT_SLURM_FLAGS, help="sbatch flags of each array task"
    )
    parser.add_argument(
        "--plot_metrics",
        default=",".join(plots.DEFAULT_METRICS),
        help="metric names or shell patterns plotted against each swept key",
    )
    args = parser.parse_args(argv)
    if args.parallel is not None and args.parallel < 1:
        parser.error(f"--parallel must be >= 1; got {args.parallel}.")
    return args


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


class State:
    """ROOT/sweep.json: the points, their commands and states (rewritten on every change)."""

    def __init__(self, sweep: plan.Sweep, args: argparse.Namespace):
        self.sweep = sweep
        self.args = args
        self.path = sweep.output(STATE_FILE)
        self.lock = threading.Lock()
        self.states: dict[str, str] = {}
        if os.path.exists(self.path):
            previous = integrity.read_json(self.path)
            old = previous.get("config_file")
            # By file name: the same sweep relaunched from another checkout (another machine,
            # a fresh clone) is the same sweep.
            if old and os.path.basename(old) != os.path.basename(sweep.path):
                raise ValueError(
                    f"{sweep.root} holds a sweep of {old}, not of {sweep.path}: use another --root."
                )

    def set(self, run: plan.Run, state: str) -> None:
        with self.lock:
            self.states[run.name] = state
            self._write()

    def refresh(self) -> None:
        with self.lock:
            self.states = {run.name: run.state() for run in self.sweep.runs}
            for run in self.sweep.runs:
                if self.states[run.name] == plan.FINISHED:
                    archive(run)
            self._write()

    def _write(self) -> None:
        os.makedirs(self.sweep.root, exist_ok=True)
        record = {
            "config": self.sweep.spec,
            "config_file": os.path.abspath(self.sweep.path),
            "keys": self.sweep.keys,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": [
                {
                    "index": run.index,
                    "name": run.name,
                    "point": run.point,
                    "workdir": run.workdir,
                    "train": train_command(run, self.args),
                    "evaluate": evaluate_command(run, self.args),
                    "state": self.states.get(run.name, "unknown"),
                }
                for run in self.sweep.runs
            ],
        }
        integrity.write_json(self.path, record)


def archive(run: plan.Run) -> None:
    """Copies a finished run's results.json from its workdir to the archive (when the sweep has
    one and the copy differs)."""
    target = run.archived_path
    if target is None or not os.path.exists(run.results_path):
        return
    record = integrity.read_json(run.results_path)
    if os.path.exists(target) and integrity.read_json(target) == record:
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    integrity.write_json(target, record)


def train_command(run: plan.Run, args: argparse.Namespace) -> list[str]:
    return [args.python, "-m", "apd.train", *run.train_args(), *shlex.split(args.train_flags)]


def evaluate_command(run: plan.Run, args: argparse.Namespace) -> list[str]:
    extra = shlex.split(args.evaluate_flags)
    return [args.python, "-m", "apd.evaluate", *run.evaluate_args(), *extra]


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def _call(command: list[str], log: str, env: dict[str, str]) -> int:
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        return subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def run_local(runs: list[plan.Run], state: State, args: argparse.Namespace) -> list[str]:
    """Trains and evaluates the runs that are not finished; returns the names that failed."""
    parallel = args.parallel or 1
    env = dict(os.environ)
    if parallel > 1:  # runs sharing an accelerator must not each reserve most of its memory
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    todo = []
    for run in runs:
        if state.states.get(run.name) == plan.FINISHED:
            print(f"{run.name}: finished", flush=True)
        else:
            todo.append(run)
    failed: list[str] = []

    def work(run: plan.Run) -> None:
        os.makedirs(run.workdir, exist_ok=True)
        steps = (
            ("train", train_command(run, args), run.trained),
            ("evaluate", evaluate_command(run, args), lambda: run.results() is not None),
        )
        for stage, command, done in steps:
            if done():
                continue
            log = os.path.join(run.workdir, f"{stage}.log")
            print(f"{run.name}: {stage} (log: {log})", flush=True)
            start = time.time()
            code = _call(command, log, env)
            if code:
                print(f"{run.name}: {stage} failed with exit code {code}; see {log}", flush=True)
                failed.append(run.name)
                state.set(run, f"failed ({stage})")
                return
            print(f"{run.name}: {stage} done in {time.time() - start:.0f} s", flush=True)
            state.set(run, run.state())
        if run.state() == plan.FINISHED:
            archive(run)

    if parallel == 1:
        for run in todo:
            work(run)
    else:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            for future in [pool.submit(work, run) for run in todo]:
                future.result()
    return failed


def print_commands(runs: list[plan.Run], state: State, args: argparse.Namespace) -> None:
    for run in runs:
        current = state.states.get(run.name)
        if current == plan.FINISHED:
            print(f"# {run.name}: finished")
            continue
        print(f"# {run.name} ({current})")
        if current != plan.TRAINED:
            print(shlex.join(train_command(run, args)))
        print(shlex.join(evaluate_command(run, args)))
    print("# then the table and plots:")
    print(shlex.join(_table_command(args)))


def _table_command(args: argparse.Namespace) -> list[str]:
    return [
        args.python,
        "-m",
        "apd.sweep",
        f"--config={args.config}",
        f"--root={args.root}",
        *([f"--archive={args.archive}"] if args.archive else []),
        "--stage=table",
    ]


def submit_slurm(runs: list[plan.Run], state: State, args: argparse.Namespace) -> str | None:
    """Writes the job array's arguments and submit command; submits unless --dry_run. Returns the
    submission directory (None when every run is finished)."""
    todo = [r for r in runs if state.states.get(r.name) != plan.FINISHED]
    if not todo:
        print("every run is finished: nothing to submit.")
        return None
    if not os.path.exists(SBATCH_SCRIPT):
        raise FileNotFoundError(f"the array script {SBATCH_SCRIPT} is missing.")
    root = state.sweep.root
    directory = os.path.join(root, "slurm", time.strftime("%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(directory if not suffix else f"{directory}-{suffix}"):
        suffix += 1
    directory = directory if not suffix else f"{directory}-{suffix}"
    args_dir = os.path.join(directory, "args")
    os.makedirs(args_dir)
    lines = []
    for task, run in enumerate(todo):
        # launch/slurm_gpu.sbatch takes CONFIG WORKDIR [flags...] for apd.train.
        train = [run.config_spec, run.workdir, *run.override_args(), *shlex.split(args.train_flags)]
        evaluate = [*run.evaluate_args(), *shlex.split(args.evaluate_flags)]
        for suffix_name, values in (("train", train), ("evaluate", evaluate)):
            if any("\n" in v for v in values):
                raise ValueError(f"run {run.name}: an argument holds a newline: {values!r}.")
            with open(os.path.join(args_dir, f"{task}.{suffix_name}"), "w", encoding="utf-8") as f:
                f.write("\n".join(values) + "\n")
        lines.append(f"{task}\t{run.name}")
    with open(os.path.join(directory, "tasks.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    array = f"0-{len(todo) - 1}" + (f"%{args.parallel}" if args.parallel else "")
    command = [
        "sbatch",
        f"--array={array}",
        f"--job-name=apd-sweep-{os.path.basename(root)}",
        f"--output={directory}/%x-%A_%a.out",
        *shlex.split(args.slurm_flags),
    ]
    if sys.prefix != sys.base_prefix:  # the tasks use this virtual environment
        command.append(f"--export=ALL,APD_VENV={sys.prefix}")
    command += [SBATCH_SCRIPT, f"--sweep={args_dir}"]
    with open(os.path.join(directory, "submit.sh"), "w", encoding="utf-8") as f:
        f.write("#!/usr/bin/env bash\n# apd.sweep: one array task per run in tasks.tsv\n")
        f.write(shlex.join(command) + "\n")
    print(f"{len(todo)} array tasks ({directory}/tasks.tsv):")
    print(shlex.join(command))
    if args.dry_run:
        print("--dry_run: not submitted.")
        return directory
    try:
        subprocess.run(command, check=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            "sbatch is not installed here: submit from a SLURM login node (the command is in "
            f"{directory}/submit.sh), or use --dry_run."
        ) from None
    for run in todo:
        state.set(run, "submitted")
    return directory


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def write_table(sweep: plan.Sweep, metrics: list[str]) -> str | None:
    """Writes ROOT/table.md, table.json and plots/ from the finished runs; returns table.md's
    text (None when no run is finished)."""
    results = {}
    for run in sweep.runs:
        record = run.results()
        if record is not None:
            results[run.name] = record
    if not results:
        return None
    data = table.build(sweep.runs, results)
    written = plots.write_all(data, sweep.output("plots"), metrics)
    text = table.markdown(data, [os.path.relpath(p, sweep.root) for p in written])
    data["config"] = sweep.spec
    integrity.write_json(sweep.output("table.json"), _jsonable(data))
    tmp = sweep.output("table.md") + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, sweep.output("table.md"))
    return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The binary: returns its exit code (1 after a user error, printed on one line)."""
    args = parse_args(argv)
    return cli.call(lambda _: sweep_main(args), [], "apd.sweep", args.verbose)


def sweep_main(args: argparse.Namespace) -> int:
    """Runs the stages `args` asks for; returns the exit code (a user error raises, see
    `apd.cli`)."""
    sweep = plan.load(args.config, args.root, args.archive)
    runs = sweep.select(args.only)
    state = State(sweep, args)
    state.refresh()
    counts: dict[str, int] = {}
    for name in state.states.values():
        counts[name] = counts.get(name, 0) + 1
    print(
        f"sweep {args.config}: {len(sweep.runs)} runs in {sweep.root} "
        f"({', '.join(f'{n} {s}' for s, n in counts.items())})",
        flush=True,
    )
    if args.stage == "status":
        for run in sweep.runs:
            where = (
                " (archived)" if state.states[run.name] == plan.FINISHED and run.archived() else ""
            )
            print(f"{state.states[run.name]:>9}  {run.name}{where}")
        return 0
    failed: list[str] = []
    if args.stage in ("all", "run"):
        if args.backend == "local":
            failed = run_local(runs, state, args)
        elif args.backend == "print":
            print_commands(runs, state, args)
        else:
            submit_slurm(runs, state, args)
    if args.stage == "table" or (args.stage == "all" and args.backend == "local"):
        text = write_table(sweep, [m for m in args.plot_metrics.split(",") if m])
        if text is None:
            if args.stage == "table":
                raise ValueError(f"no run of the sweep in {sweep.root} is finished yet.")
        else:
            print(text)
            print(f"table: {sweep.output('table.md')}")
    if failed:
        print(
            f"apd.sweep: {len(failed)} run(s) failed: {', '.join(failed)} (see their logs).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
