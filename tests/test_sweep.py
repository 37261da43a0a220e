"""The sweep tool (`python -m apd.sweep`): get_hyper expansion and checks, run names, resume,
the slurm array on a dry run, the table over training seeds and its plots, the sweep configs.

Finished runs are made by hand: a committed checkpoint directory and a results.json holding
every unit the run's evaluation declares, with its settings and a summary made by the
evaluation's own `protocol.summarise`. One test runs the local backend end to end on two smoke
points (real apd.train and apd.evaluate subprocesses).
"""

import json
import os
import re
import shutil
import subprocess

import helpers
import jax
import pytest
import scipy.stats

from apd import sweep as sweep_cli
from apd.data import fashion_mnist as fmnist_data
from apd.evaluation import features, integrity, protocol
from apd.sweeps import hyper, plan, plots, table
from experiments import ablation_samplers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = hyper.Hyper()

CONFIG = """
from experiments import fashion_mnist
from experiments import common


def get_config(arg=None):
    arg = common.parse_arg(arg, sampler="asyncpatch", flag=False)
    config = fashion_mnist.get_config(f"sampler={{arg.sampler}},smoke")
    config.data.path = {data_path!r}
    config.total_steps = 2
    config.checkpoint.every_steps = 2
    config.evaluate.evaluators = ("generation",)
    config.evaluate.seeds = (0, 1)
    config.evaluate.generation.num_samples = 8
    return config


def get_hyper(h):
    return {hyper}
"""


def write_config(tmp_path, hyper_expr: str, data_path: str = "/nonexistent") -> str:
    path = tmp_path / "sweep_config.py"
    path.write_text(CONFIG.format(hyper=hyper_expr, data_path=data_path))
    return str(path)


def main(*argv):
    helpers.call_main(lambda: sweep_cli.main(list(argv)))


# ---------------------------------------------------------------------------------------------
# get_hyper expansion
# ---------------------------------------------------------------------------------------------


def test_product_zip_chain_fixed():
    product = H.product([H.sweep("a", [1, 2]), H.sweep("b", ["x", "y"])])
    assert product == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    zipped = H.zipit([H.sweep("a", [1, 2]), H.sweep("b", [[1, 2], (3,)])])
    assert zipped == [{"a": 1, "b": (1, 2)}, {"a": 2, "b": (3,)}]  # lists become tuples
    chained = H.chainit([H.sweep("a", [1]), H.product([H.fixed("a", 2), H.fixed("c", True)])])
    assert chained == [{"a": 1}, {"a": 2, "c": True}]
    nested = H.product(
        [H.chainit([H.sweep(":s", ["p", "q"]), H.fixed("z", 0.5)]), H.sweep("seed", range(2))]
    )
    assert len(nested) == 6 and nested[4] == {"z": 0.5, "seed": 0}


@pytest.mark.parametrize(
    "build,match",
    [
        (
            lambda: H.zipit([H.sweep("a", [1, 2]), H.sweep("b", [1])]),
            r"one length; got lengths \[2, 1\]",
        ),
        (lambda: H.product([H.sweep("a", [1]), H.sweep("a", [2])]), r"\['a'\] are swept twice"),
        (lambda: H.zipit([H.sweep("a", [1]), H.fixed("a", 2)]), r"swept twice"),
        (lambda: H.sweep("a", "abc"), r"sequence of values.*'abc'"),
        (lambda: H.sweep("a", []), r"no values"),
        (lambda: H.sweep("a", [1, 1]), r"repeats the value 1"),
        (lambda: H.sweep("a", [{"x": 1}]), r"bool, int, float, str or a tuple.*dict"),
        (lambda: H.sweep("a", [float("nan")]), r"finite"),
        (lambda: H.sweep("a", [((1, 2),)]), r"nested"),
        (lambda: H.sweep("levels params", [1]), r"'levels params' must be a config path"),
        (lambda: H.product([]), r"non-empty list of sweeps"),
        (lambda: H.product([[]]), r"non-empty lists of points"),
    ],
)
def test_hyper_rejects(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_expand_rejects_duplicates_and_non_lists():
    with pytest.raises(ValueError, match=r"declares the point \{'a': 1\} twice"):
        hyper.expand(lambda h: h.chainit([h.sweep("a", [1]), h.sweep("a", [1])]), "X")
    with pytest.raises(ValueError, match="must return a list of points"):
        hyper.expand(lambda h: h.sweep("a", [1])[0], "X")


# ---------------------------------------------------------------------------------------------
# Run names
# ---------------------------------------------------------------------------------------------


def test_run_names_are_stable_and_safe():
    points = H.product(
        [
            H.sweep("levels.params.delta_max", [0.25, 1]),
            H.sweep("seed", [0]),
            H.sweep(":sampler", ["asyncpatch"]),
        ]
    )
    names = hyper.run_names(points)
    assert names == [
        "delta_max=0.25,sampler=asyncpatch,seed=0",
        "delta_max=1,sampler=asyncpatch,seed=0",
    ]
    # The order of declaration does not matter; names depend on the overrides only.
    swapped = H.product(
        [
            H.sweep("seed", [0]),
            H.sweep(":sampler", ["asyncpatch"]),
            H.sweep("levels.params.delta_max", [0.25, 1]),
        ]
    )
    assert hyper.run_names(swapped) == names
    # Tuples, shared last components, unsafe characters, no overrides.
    points = [
        {"levels.params.patch_sizes": (1, 2, 4), "evaluate.seed": 1, "seed": 0},
        {"data.path": "/a b/c"},
        {},
    ]
    assert hyper.run_names(points) == [
        "evaluate.seed=1,patch_sizes=1_2_4,seed=0",
        "path=-a-b-c",
        "base",
    ]


def test_run_names_must_differ():
    with pytest.raises(ValueError, match="same run name 'path=a-b'"):
        hyper.run_names([{"data.path": "a/b"}, {"data.path": "a b"}])


# ---------------------------------------------------------------------------------------------
# Checks against the config, before any run starts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hyper_expr,match",
    [
        ('h.sweep("evaluate.step", [5])', r"'evaluate.step' is not a key.*: 'evaluate.steps'"),
        ('h.sweep("levels.params", [0.1])', r"'levels.params' is a group of keys"),
        (
            'h.sweep("levels.params.delta_maxx", [0.1])',
            r"run delta_maxx=0.1: .*unknown parameter 'delta_maxx'.*'delta_max'",
        ),
        (
            'h.product([h.fixed("levels.name", "perlin"), h.fixed("levels.params.t_min", 0.3)])',
            r"unknown parameter 't_min' for level sampler 'perlin'",
        ),
        ('h.sweep("levels.params.delta_max", ["big"])', r"run delta_max=big: .*got 'big'"),
        ('h.sweep("seed", [0, 1.5])', r"seed=1.5.*int"),
        ('h.sweep(":samplr", ["perlin"])', r"unknown config argument 'samplr'"),
        ('h.sweep(":flag", ["maybe"])', r"flag=.maybe.*not a boolean"),
        (
            'h.sweep("levels.params.delta_max", [0.5, 1.5])',
            r"run delta_max=1.5: .*delta_max must be a finite number in \[0.0, 1.0\]; got 1.5",
        ),
        ('h.sweep("evaluate.seeds", [(0, -1)])', r"seeds"),
    ],
)
def test_bad_keys_and_values_fail_before_any_run(tmp_path, capsys, hyper_expr, match):
    root = tmp_path / "root"
    config = write_config(tmp_path, hyper_expr)
    with pytest.raises(SystemExit) as info:
        main(f"--config={config}", f"--root={root}", "--backend=local")
    assert info.value.code.startswith("apd.sweep: error:")
    assert re.search(match, info.value.code), info.value.code
    assert not root.exists()  # nothing was written, nothing ran


def test_level_sampler_switched_by_override(tmp_path):
    """levels.name starts the new sampler from its defaults; its own parameters can be swept."""
    config = write_config(
        tmp_path,
        'h.product([h.fixed("levels.name", "perlin"), h.sweep("levels.params.scale", [1, 4])])',
    )
    sweep = plan.load(config, str(tmp_path))
    assert [r.name for r in sweep.runs] == ["name=perlin,scale=1", "name=perlin,scale=4"]
    assert sweep.runs[1].config.levels.to_dict() == {
        "name": "perlin",
        "params": {"scale": 4, "threshold": 0.0, "octaves": 1},
    }
    assert sweep.runs[1].train_args()[2:] == [
        "--config.levels.name=perlin",
        "--config.levels.params.scale=4",
    ]


def test_config_argument_conflict(tmp_path):
    config = write_config(tmp_path, 'h.sweep(":sampler", ["perlin"])')
    with pytest.raises(ValueError, match=r"'sampler'.*also set"):
        plan.load(f"{config}:sampler=asyncpatch", str(tmp_path))


def test_commands_pass_overrides_and_arguments(tmp_path):
    config = write_config(
        tmp_path,
        'h.product([h.sweep(":sampler", ["perlin"]), h.sweep("levels.params.threshold", [0.25])])',
    )
    sweep = plan.load(f"{config}:flag", str(tmp_path / "r"))
    (run,) = sweep.runs
    assert run.name == "sampler=perlin,threshold=0.25"
    assert run.train_args() == [
        f"--config={config}:flag,sampler=perlin",
        f"--workdir={tmp_path}/r/sampler=perlin,threshold=0.25",
        "--config.levels.params.threshold=0.25",
    ]
    assert run.evaluate_args()[2] == "--checkpoint=2"
    assert run.config.levels.name == "perlin" and run.config.levels.params.threshold == 0.25


# ---------------------------------------------------------------------------------------------
# Finished runs by hand
# ---------------------------------------------------------------------------------------------


def fake_finished(run: plan.Run, value=lambda unit, metric: 1.0, trained_only=False):
    """A committed final checkpoint and (unless trained_only) a complete results.json."""
    os.makedirs(os.path.join(run.workdir, "checkpoints", str(run.total_steps)), exist_ok=True)
    if trained_only:
        return
    units = protocol.units(run.config.evaluate)
    records = []
    for unit in units:
        names = ["fid"] if unit.evaluator == "generation" else ["fid", "psnr"]
        if unit.evaluator == "likelihood":
            names = ["bits_per_dim"]
        records.append(
            {
                "unit": unit.name,
                "settings": protocol.unit_settings(unit, run.config.evaluate),
                "metrics": {m: value(unit, m) for m in names},
            }
        )
    step_dir = os.path.join(run.eval_dir, f"step_{run.total_steps:08d}")
    os.makedirs(step_dir)
    integrity.write_json(
        os.path.join(step_dir, "results.json"),
        {
            "step": run.total_steps,
            "units_expected": [u.name for u in units],
            "units": records,
            "summary": protocol.summarise(records, units),
            "provenance": {
                "evaluate": run.config.evaluate.to_dict(),
                "features": {"name": "fmnist"},
            },
        },
    )


def test_resume_does_only_what_is_missing(tmp_path, capsys):
    config = write_config(tmp_path, 'h.sweep("seed", [0, 1, 2])')
    root = tmp_path / "root"
    sweep = plan.load(config, str(root))
    fake_finished(sweep.runs[0])
    fake_finished(sweep.runs[1], trained_only=True)
    assert [r.state() for r in sweep.runs] == [plan.FINISHED, plan.TRAINED, plan.PENDING]
    capsys.readouterr()
    main(f"--config={config}", f"--root={root}", "--backend=print")
    out = capsys.readouterr().out
    assert "# seed=0: finished" in out
    assert out.count("-m apd.train") == 1 and "--workdir=" + str(root / "seed=2") in out
    assert out.count("-m apd.evaluate") == 2  # seed=1 (trained) and seed=2
    assert f"--workdir={root / 'seed=1'} --checkpoint=2" in out
    state = json.loads((root / "sweep.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["finished", "trained", "pending"]
    assert state["runs"][2]["train"][1:3] == ["-m", "apd.train"]
    # The local backend starts nothing for a finished run (a subprocess would leave a log).
    main(f"--config={config}", f"--root={root}", "--backend=local", "--only=seed=0")
    assert not (root / "seed=0" / "train.log").exists()
    assert not (root / "seed=0" / "evaluate.log").exists()
    # A results.json computed with other settings is not finished.
    sweep.runs[0].config.evaluate.unlock()
    sweep.runs[0].config.evaluate.steps = 5
    assert sweep.runs[0].state() == plan.TRAINED


def test_archive_keeps_finished_runs_without_their_workdirs(tmp_path, capsys):
    """--archive=DIR: finished runs' results.json copied to DIR/RUN.json; with the workdir gone
    the run stays finished (nothing retrained) and the table is built from the copies."""
    config = write_config(tmp_path, 'h.sweep("seed", [0, 1])')
    root, archive_dir = tmp_path / "root", tmp_path / "archive"
    sweep = plan.load(config, str(root))
    fake_finished(sweep.runs[0], value=lambda unit, metric: 7.0)
    main(f"--config={config}", f"--root={root}", f"--archive={archive_dir}", "--stage=status")
    copy = archive_dir / "seed=0.json"
    assert copy.exists() and not (archive_dir / "seed=1.json").exists()
    assert json.loads(copy.read_text()) == integrity.read_json(sweep.runs[0].results_path)
    shutil.rmtree(root / "seed=0")  # another machine, a cleaned disk, a new session
    capsys.readouterr()
    main(f"--config={config}", f"--root={root}", f"--archive={archive_dir}", "--stage=status")
    assert "finished  seed=0 (archived)" in capsys.readouterr().out
    main(f"--config={config}", f"--root={root}", f"--archive={archive_dir}", "--backend=print")
    out = capsys.readouterr().out
    assert "# seed=0: finished" in out and out.count("-m apd.train") == 1
    assert f"--archive={archive_dir} --stage=table" in out
    main(f"--config={config}", f"--root={root}", f"--archive={archive_dir}", "--stage=table")
    assert "| all | 7.00 ± 0.00 |" in (root / "table.md").read_text()
    # Without the archive the run is pending again; with other settings the copy is not used.
    assert plan.load(config, str(root)).runs[0].state() == plan.PENDING
    archived = plan.load(config, str(root), str(archive_dir)).runs[0]
    assert archived.state() == plan.FINISHED and archived.archived()
    archived.config.evaluate.unlock()
    archived.config.evaluate.steps = 5
    assert archived.state() == plan.PENDING


def test_linked_workdir_of_an_identical_run_is_finished_and_archived(tmp_path, capsys):
    """A point whose config is another sweep's run (delta_max = 0.5 is the ablation's asyncpatch
    run) reuses that run's workdir through a link: finished, nothing retrained, archived under
    this sweep's run name."""
    config = write_config(tmp_path, 'h.sweep("seed", [0, 1])')
    other = plan.load(config, str(tmp_path / "other")).runs[0]
    fake_finished(other, value=lambda unit, metric: 3.0)
    root, archive_dir = tmp_path / "root", tmp_path / "archive"
    root.mkdir()
    os.symlink(other.workdir, root / "seed=0")
    main(f"--config={config}", f"--root={root}", f"--archive={archive_dir}", "--backend=print")
    out = capsys.readouterr().out
    assert "# seed=0: finished" in out and out.count("-m apd.train") == 1
    copy = json.loads((archive_dir / "seed=0.json").read_text())
    assert copy == integrity.read_json(other.results_path)


def test_only_selects_runs(tmp_path):
    config = write_config(
        tmp_path,
        'h.product([h.sweep(":sampler", ["perlin", "asyncpatch"]), h.sweep("seed", [0, 1])])',
    )
    sweep = plan.load(config, str(tmp_path))
    assert [r.name for r in sweep.select(["sampler=perlin,*"])] == [
        "sampler=perlin,seed=0",
        "sampler=perlin,seed=1",
    ]
    with pytest.raises(ValueError, match=r"names no run.*closest: 'sampler=perlin,seed=1'"):
        sweep.select(["sampler=perlin,seed=7"])


def test_other_config_in_the_same_root_fails(tmp_path):
    root = tmp_path / "root"
    config = write_config(tmp_path, "h.sweep('seed', [0])")
    main(
        f"--config={config}",
        f"--root={root}",
        "--stage=status",
    )
    other = tmp_path / "other.py"
    other.write_text((tmp_path / "sweep_config.py").read_text())
    with pytest.raises(SystemExit, match="holds a sweep of"):
        main(f"--config={other}", f"--root={root}", "--stage=status")
    # The same config from another checkout (a fresh clone, another machine) is the same sweep.
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "sweep_config.py").write_text((tmp_path / "sweep_config.py").read_text())
    main(f"--config={clone / 'sweep_config.py'}", f"--root={root}", "--stage=status")


def test_named_evaluation_evaluates_the_training_sweeps_runs(tmp_path, capsys):
    """A config with EVALUATION = "NAME" shares --root with the sweep that trains the runs: it
    retrains nothing, evaluates into RUN/eval_NAME and keeps its own state and table files."""
    config = write_config(tmp_path, 'h.sweep("seed", [0, 1])')
    named = tmp_path / "named.py"
    named.write_text(
        (tmp_path / "sweep_config.py")
        .read_text()
        .replace(
            "    return config\n",
            '    config.evaluate.generation.methods = ("ddim", "ddim:cfg=2")\n    return config\n',
        )
        + '\nEVALUATION = "cfg"\n'
    )
    root = tmp_path / "root"
    training = plan.load(config, str(root))
    fake_finished(training.runs[0])
    fake_finished(training.runs[1], trained_only=True)
    main(f"--config={config}", f"--root={root}", "--stage=status")
    capsys.readouterr()
    main(f"--config={named}", f"--root={root}", "--backend=print")
    out = capsys.readouterr().out
    assert "-m apd.train" not in out  # both runs are trained
    for seed in (0, 1):
        assert f"--workdir={root / f'seed={seed}'} --checkpoint=2 --out=" in out
        assert f"--out={root / f'seed={seed}' / 'eval_cfg'}" in out
    assert json.loads((root / "sweep.cfg.json").read_text())["config_file"] == str(named)
    assert json.loads((root / "sweep.json").read_text())["config_file"] == config
    # The named evaluation's results: its own table, the training sweep's untouched.
    sweep = plan.load(str(named), str(root))
    assert [r.eval_dir for r in sweep.runs] == [
        str(root / "seed=0" / "eval_cfg"),
        str(root / "seed=1" / "eval_cfg"),
    ]
    for run in sweep.runs:
        fake_finished(run, value=lambda unit, metric: 3.0 if unit.method.name else 1.0)
    main(f"--config={named}", f"--root={root}", "--stage=table")
    text = (root / "table.cfg.md").read_text()
    assert "ddim_cfg2 on all (n=2) | 3.00 ± 0.00" in text
    assert not (root / "table.md").exists() and (root / "plots.cfg").is_dir()
    assert training.runs[0].state() == plan.FINISHED and training.runs[1].state() == plan.TRAINED
    bad = tmp_path / "bad.py"
    bad.write_text(named.read_text() + '\nEVALUATION = "a/b"\n')
    with pytest.raises(ValueError, match="EVALUATION names an evaluation"):
        plan.load(str(bad), str(root))


def test_sampling_settings_evaluate_the_ablations_runs(tmp_path):
    sweep = plan.load(os.path.join(REPO, "experiments", "sampling_settings.py"), str(tmp_path))
    ablation = plan.load(os.path.join(REPO, "experiments", "ablation_samplers.py"), str(tmp_path))
    trained = {r.name: r for r in ablation.runs}
    assert len(sweep.runs) == 6 and sweep.evaluation == "sampling"
    for run in sweep.runs:
        other = trained[run.name]  # the same run directory as the ablation's point
        assert run.workdir == other.workdir
        for key in run.config:
            if key != "evaluate":
                assert run.config[key] == other.config[key], (run.name, key)
        names = [u.method.name for u in protocol.units(run.config.evaluate) if u.family == "wide"]
        assert names[:2] == ["apd", "apd_s75"]
        if run.point[":sampler"] == "synchronous":
            assert names[2:] == ["repaint", "repaint_s25_j1_r3", "repaint_s25_j10_r10"]
        else:
            assert "apd_ig4" in names and "apd_ig1.5_ctx0.5" in names


# ---------------------------------------------------------------------------------------------
# slurm
# ---------------------------------------------------------------------------------------------


def test_slurm_dry_run_writes_the_array(tmp_path, capsys):
    config = write_config(
        tmp_path,
        'h.product([h.sweep(":sampler", ["perlin", "asyncpatch"]), h.sweep("seed", [0, 1])])',
    )
    root = tmp_path / "root"
    fake_finished(plan.load(config, str(root)).runs[0])  # finished: not in the array
    main(
        f"--config={config}",
        f"--root={root}",
        "--backend=slurm",
        "--dry_run",
        "--parallel=2",
        "--evaluate_flags=--feature_dir=/f --cache_dir=/c",
    )
    (directory,) = (root / "slurm").iterdir()
    tasks = (directory / "tasks.tsv").read_text().splitlines()
    assert tasks == [
        "0\tsampler=perlin,seed=1",
        "1\tsampler=asyncpatch,seed=0",
        "2\tsampler=asyncpatch,seed=1",
    ]
    submit = (directory / "submit.sh").read_text()
    script = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
    assert (
        f"sbatch --array=0-2%2 --job-name=apd-sweep-root --output={directory}/%x-%A_%a.out"
        in submit
    )
    assert "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1" in submit
    assert submit.rstrip().endswith(f"{script} --sweep={directory}/args")
    train = (directory / "args" / "1.train").read_text().splitlines()
    assert train == [
        f"{config}:sampler=asyncpatch",
        str(root / "sampler=asyncpatch,seed=0"),
        "--config.seed=0",
    ]
    evaluate = (directory / "args" / "1.evaluate").read_text().splitlines()
    assert evaluate == [
        f"--config={config}:sampler=asyncpatch",
        f"--workdir={root / 'sampler=asyncpatch,seed=0'}",
        "--checkpoint=2",
        "--config.seed=0",
        "--feature_dir=/f",
        "--cache_dir=/c",
    ]
    assert "not submitted" in capsys.readouterr().out
    # The array script reads those files in --sweep mode; its syntax is valid bash.
    with open(script, encoding="utf-8") as f:
        text = f.read()
    assert 'mapfile -t train_args < "$args_dir/$task.train"' in text
    assert 'mapfile -t eval_args < "$args_dir/$task.evaluate"' in text
    assert '-m apd.evaluate "${eval_args[@]}"' in text
    subprocess.run(["bash", "-n", script], check=True)


# ---------------------------------------------------------------------------------------------
# Table and plots
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10, 29, 30, 100])
def test_t_quantile_matches_scipy(df):
    assert table.t_quantile(df) == pytest.approx(scipy.stats.t.ppf(0.975, df), rel=1e-9)
    assert table.t_quantile(df, 0.9) == pytest.approx(scipy.stats.t.ppf(0.9, df), rel=1e-9)


def test_table_over_training_seeds(tmp_path):
    config = write_config(
        tmp_path,
        'h.product([h.sweep("levels.params.delta_max", [0.0, 0.5]), h.sweep("seed", [0, 1, 2])])',
    )
    root = tmp_path / "root"
    sweep = plan.load(config, str(root))
    fids = {}
    for run in sweep.runs[:5]:  # the last run (delta_max=0.5, seed=2) is not finished
        base = 10.0 * (1 + run.point["levels.params.delta_max"]) + run.point["seed"]
        fids[run.name] = base
        fake_finished(run, lambda unit, metric, base=base: base + unit.seed)  # eval seeds 0, 1
    main(f"--config={config}", f"--root={root}", "--stage=table")
    data = json.loads((root / "table.json").read_text())
    (first, second) = data["groups"]
    assert first["name"] == "delta_max=0.0" and first["runs"] == [r.name for r in sweep.runs[:3]]
    assert second["missing"] == ["delta_max=0.5,seed=2"]
    fid = first["metrics"]["generation/fid"]
    values = [10.5, 11.5, 12.5]  # each run: its mean over evaluation seeds
    assert fid["values"] == values and fid["mean"] == pytest.approx(11.5)
    low, high = scipy.stats.t.interval(0.95, 2, loc=11.5, scale=scipy.stats.sem(values))
    assert fid["ci95"] == pytest.approx([low, high])
    fid = second["metrics"]["generation/fid"]
    assert fid["n"] == 2 and fid["ci95"] == pytest.approx(
        list(scipy.stats.t.interval(0.95, 1, loc=16.0, scale=scipy.stats.sem([15.5, 16.5])))
    )
    text = (root / "table.md").read_text()
    assert text.startswith("mean ± 95% t-interval half-width over training seeds")
    assert "| run | generation fid |" in text
    assert f"| delta_max=0.0 (n=3) | 11.50 ± {(high - low) / 2:.2f} |" in text
    assert "Not evaluated yet: delta_max=0.5,seed=2." in text
    plot = root / "plots" / "vs_delta_max.png"
    assert plot.stat().st_size > 10_000 and "(plots/vs_delta_max.png)" in text


def test_family_means_per_evaluation_seed_then_over_training_seeds(tmp_path):
    """inpainting/mean/METHOD/METRIC: each run's mean over mask families per evaluation seed; the
    group's interval is over the runs' family means. The trade-off curve joins the points."""
    config = write_config(
        tmp_path,
        'h.product([h.sweep("levels.params.delta_max", [0.0, 0.5]), h.sweep("seed", [0, 1])])',
    )
    root = tmp_path / "root"
    sweep = plan.load(config, str(root))
    offset = {"square": 0.0, "wide": 4.0}

    def value(run):
        def fn(unit, metric):
            if unit.evaluator == "generation":
                return 10.0 + run.point["levels.params.delta_max"]
            return 20.0 + offset[unit.family] + unit.seed + 2.0 * run.point["seed"]

        return fn

    for run in sweep.runs:
        run.config.evaluate.unlock()
        run.config.evaluate.evaluators = ("generation", "inpainting")
        run.config.evaluate.inpainting.families = ("square", "wide")
        fake_finished(run, value(run))
    summary = integrity.read_json(sweep.runs[1].results_path)["summary"]
    mean = table.with_family_means(summary)["inpainting/mean/apd/fid"]
    assert mean["values"] == [24.0, 25.0] and mean["seeds"] == [0, 1]  # (22+26)/2, (23+27)/2
    assert mean["std"] == pytest.approx(0.7071, abs=1e-4)
    assert "inpainting/mean/apd/known_max_abs_error" not in table.with_family_means(summary)
    data = table.build(
        sweep.runs, {r.name: integrity.read_json(r.results_path) for r in sweep.runs}
    )
    entry = data["groups"][0]["metrics"]["inpainting/mean/apd/fid"]
    assert entry["values"] == [22.5, 24.5] and entry["n"] == 2  # training seeds 0 and 1
    assert plots._curve(data["groups"]) == data["groups"]
    path = tmp_path / "scatter.png"
    assert plots.fid_scatter(data, str(path)) and path.stat().st_size > 10_000
    # No curve across unrelated settings (a string key, or two keys).
    assert (
        plots._curve([{"overrides": {":sampler": "a"}}, {"overrides": {":sampler": "b"}}]) is None
    )


def test_table_names_each_groups_step_when_the_runs_train_for_different_lengths(tmp_path):
    config = write_config(tmp_path, 'h.sweep("total_steps", [2, 3])')
    root = tmp_path / "root"
    sweep = plan.load(config, str(root))
    for run in sweep.runs:
        fake_finished(run)
    main(f"--config={config}", f"--root={root}", "--stage=table")
    data = json.loads((root / "table.json").read_text())
    assert data["step"] is None
    assert [g["steps"] for g in data["groups"]] == [[2], [3]]
    text = (root / "table.md").read_text()
    assert "Steps total_steps=2 2, total_steps=3 3;" in text and "Step None" not in text


def _old_ablation_value(sampler_index):
    def value(unit, metric):
        repaint = unit.method is not None and unit.method.kind == "repaint"
        base = 10.0 + sampler_index + (5.0 if repaint else 0.0)
        return (20.0 if metric == "psnr" else base) + 0.5 * unit.seed

    return value


def test_ablation_table_reproduces_the_single_seed_table(tmp_path, capsys):
    """With only the seed-0 runs finished, every group has one run: mean ± std over evaluation
    seeds, rows and columns as in the single-seed ablation's table (RePaint on synchronous)."""
    root = tmp_path / "root"
    config = os.path.join(REPO, "experiments", "ablation_samplers.py")
    sweep = plan.load(f"{config}:smoke", str(root))
    for run in sweep.runs:
        if run.point["seed"] == 0 and "levels.params.patch_sizes" not in run.point:
            index = ablation_samplers.SAMPLERS.index(run.point[":sampler"])
            fake_finished(run, _old_ablation_value(index))
    text = sweep_cli.write_table(sweep, ["generation/fid"])
    lines = text.splitlines()
    assert lines[0].startswith("mean ± std over evaluation seeds. Step 4; evaluation seeds [0, 1]")
    header = "| run | generation fid | square fid | wide fid | mean fid |"  # the smoke families
    start = lines.index(header)
    cells = " | ".join(["10.25 ± 0.35"] * 4)
    assert lines[start + 2] == f"| sampler=synchronous | {cells} |"
    assert (
        lines[start + 3]
        == "| repaint on sampler=synchronous | - | 15.25 ± 0.35 | 15.25 ± 0.35 | 15.25 ± 0.35 |"
    )
    assert f"| sampler=asyncpatch | {' | '.join(['14.25 ± 0.35'] * 4)} |" in lines
    assert "| run | square psnr | wide psnr | mean psnr |" in lines
    data = json.loads((root / "table.json").read_text())
    perlin = next(g for g in data["groups"] if g["name"] == "sampler=perlin")
    assert perlin["metrics"]["inpainting/wide/apd/fid"]["mean"] == 13.25
    assert perlin["missing"] == ["sampler=perlin,seed=1", "sampler=perlin,seed=2"]
    assert (root / "plots" / "fid_generation_vs_inpainting.png").stat().st_size > 10_000
    assert (root / "plots" / "vs_sampler.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# The sweep configs
# ---------------------------------------------------------------------------------------------


def test_ablation_sweep_keeps_the_single_seed_runs(tmp_path):
    sweep = plan.load(os.path.join(REPO, "experiments", "ablation_samplers.py"), str(tmp_path))
    assert len(sweep.runs) == 18
    by_name = {r.name: r for r in sweep.runs}
    for sampler in ablation_samplers.SAMPLERS:
        for seed in ablation_samplers.SEEDS:
            run = by_name[f"sampler={sampler},seed={seed}"]
            expected = ablation_samplers.get_config(f"sampler={sampler}")
            expected.seed = seed
            assert run.config.to_dict() == expected.to_dict()
    # patchwise with K fixed at 4: the earlier ablation's patchwise run (see test_levels).
    run = by_name["patch_sizes=4,sampler=patchwise,seed=0"]
    assert run.config.levels.name == "patchwise"
    assert run.config.levels.params.to_dict() == {"patch_sizes": (4,), "patch_probs": (1.0,)}
    assert by_name["sampler=patchwise,seed=0"].config.levels.params.patch_sizes == (1, 2, 4, 8, 16)


@pytest.mark.parametrize(
    "name,count,key,values,shared",
    [
        (
            "sweep_delta_max",
            18,
            "levels.params.delta_max",
            (0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
            "delta_max=0.5",
        ),
        ("sweep_patch_grid", 21, "levels.params.patch_sizes", None, "patch_sizes=1_2_4_8_16"),
    ],
)
def test_planned_sweeps(tmp_path, name, count, key, values, shared):
    sweep = plan.load(os.path.join(REPO, "experiments", f"{name}.py"), str(tmp_path))
    # The point whose config is the ablation's asyncpatch run, seed for seed (its workdirs are
    # linked rather than retrained: see the configs' docstrings).
    for seed in ablation_samplers.SEEDS:
        expected = ablation_samplers.get_config("sampler=asyncpatch")
        expected.seed = seed
        run = next(r for r in sweep.runs if r.name == f"{shared},seed={seed}")
        assert run.config.to_dict() == expected.to_dict()
    assert len(sweep.runs) == count
    assert sweep.keys == [key, "seed"]
    if values:
        assert tuple(dict.fromkeys(r.point[key] for r in sweep.runs)) == values
    for run in sweep.runs:
        assert run.config.levels.name == "asyncpatch"
        reference = ablation_samplers.get_config("sampler=asyncpatch")
        assert run.config.evaluate.to_dict() == reference.evaluate.to_dict()
        assert run.config.model.to_dict() == reference.model.to_dict()


# ---------------------------------------------------------------------------------------------
# The local backend, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_backend_end_to_end(tmp_path, monkeypatch):
    """A smoke point trained and evaluated by the real binaries beside a finished point that
    the sweep skips; a relaunch finds both finished and starts nothing."""
    data_path = helpers.write_fake_fashion_mnist(str(tmp_path / "fmnist"))
    feature_dir = str(tmp_path / "features")
    images, labels = fmnist_data.load("train", data_path)
    params = features.train(jax.random.key(0), images, labels, 5, 32, 1e-3)
    features.save(feature_dir, params, {"dataset": "fashion_mnist", "test_accuracy": 0.0})
    grid = 'h.fixed("levels.params.patch_sizes", (1, 2)), '
    grid += 'h.fixed("levels.params.patch_probs", [0.5, 0.5])'
    config = write_config(tmp_path, f'h.product([{grid}, h.sweep("seed", [0, 1])])', data_path)
    root = tmp_path / "root"
    fake_finished(plan.load(config, str(root)).runs[1], lambda unit, metric: 50.0)
    first, second = (root / f"patch_probs=0.5_0.5,patch_sizes=1_2,seed={s}" for s in (0, 1))
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    flags = f"--evaluate_flags=--feature_dir={feature_dir} --cache_dir={tmp_path / 'cache'}"
    main(f"--config={config}", f"--root={root}", flags)
    state = json.loads((root / "sweep.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["finished", "finished"]
    assert (first / "train.log").exists() and (first / "evaluate.log").exists()
    assert not (second / "train.log").exists()
    trained = json.loads((first / "config.json").read_text())  # the tuple overrides arrived
    assert trained["levels"]["params"]["patch_sizes"] == [1, 2]
    assert trained["levels"]["params"]["patch_probs"] == [0.5, 0.5]
    assert trained["seed"] == 0
    results = json.loads((first / "eval" / "step_00000002" / "results.json").read_text())
    assert results["provenance"]["workdir"] == str(first)
    assert results["provenance"]["evaluate"]["generation"]["num_samples"] == 8
    data = json.loads((root / "table.json").read_text())
    (group,) = data["groups"]
    fid = group["metrics"]["generation/fid"]
    assert group["runs"] == [first.name, second.name] and fid["n"] == 2 and fid["values"][1] == 50
    logs = {p: p.stat().st_mtime for p in root.glob("*/*.log")}
    main(f"--config={config}", f"--root={root}")
    assert {p: p.stat().st_mtime for p in root.glob("*/*.log")} == logs


def test_paired_differences_against_the_default_method_on_the_same_runs(tmp_path):
    """A setting that adds 0.5 on every run pairs to 0.5 ± 0 while the two groups' own
    intervals (spread by the runs) overlap; calls and known-pixel errors are not paired."""
    config = write_config(tmp_path, 'h.sweep("seed", [0, 1, 2])')
    root = tmp_path / "root"
    sweep = plan.load(config, str(root))

    def value(run):
        def fn(unit, metric):
            base = 20.0 + 3.0 * run.point["seed"] + unit.seed
            return base + (0.5 if unit.method.name == "apd_ig1" else 0.0)

        return fn

    for run in sweep.runs:
        run.config.evaluate.unlock()
        run.config.evaluate.evaluators = ("inpainting",)
        run.config.evaluate.inpainting.families = ("square", "wide")
        run.config.evaluate.inpainting.methods = ("apd", "apd:ig=1")
        fake_finished(run, value(run))
    data = table.build(
        sweep.runs, {r.name: integrity.read_json(r.results_path) for r in sweep.runs}
    )
    group = data["groups"][0]
    assert group["metrics"]["inpainting/wide/apd/fid"]["error"] > 5.0  # the runs' spread
    paired = group["paired"]["inpainting/mean/apd_ig1/fid"]
    assert paired["mean"] == pytest.approx(0.5) and paired["error"] == pytest.approx(0.0)
    assert "inpainting/wide/apd/fid" not in group["paired"]  # the default itself
    assert not any(n.endswith(("known_max_abs_error", "calls_per_image")) for n in group["paired"])
    assert table.baseline_name("generation/ddim_cfg2/kid") == "generation/kid"
    text = table.markdown(data)
    assert "fid, paired:" in text and "| apd_ig1 on all (n=3) | 0.5000 ± 0.0000 |" in text
