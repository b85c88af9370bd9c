"""Any problem as a task (issue 11): a user's model, data and black-box objective, trained
from the CLI by plug-in name and from a script through ``zohpc.run``.

The plug-ins are user modules: tests/scripts/task_plugins.py copied into a temporary
directory as ``zoplug.py`` and the README's example (zohpc/tasks/examples.py) copied as
``my_problem.py``; subprocesses find them through PYTHONPATH. Every MPI run goes through
``mpiexec -n K`` with a timeout (tests/mpi_util.py).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from mpi_util import ROOT, run_ranks
from zohpc.checkpoint import list_checkpoints, load_checkpoint
from zohpc.config import load_config
from zohpc.errors import UserError
from zohpc.tasks import Task
from zohpc.tasks.loading import build_task, check_task
from zohpc.zo import Coordinates, Objective, QueryEngine, cge
from zohpc.zo.stacked import FullForwardEngine

SCRIPTS = os.path.join(ROOT, "tests", "scripts")
EXAMPLE = os.path.join(ROOT, "zohpc", "tasks", "examples.py")
BYO = os.path.join(ROOT, "configs", "bring_your_own.toml")


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """A directory holding the user modules ``zoplug`` and ``my_problem`` (outside the package)."""
    d = tmp_path_factory.mktemp("plugins")
    shutil.copy(os.path.join(SCRIPTS, "task_plugins.py"), d / "zoplug.py")
    shutil.copy(EXAMPLE, d / "my_problem.py")
    return d


def pythonpath(plugins) -> str:
    return os.pathsep.join([str(plugins), ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def train(k, plugins, out, *sets, config=None, timeout=120, **env):
    args = ["-m", "zohpc.train", "--out", str(out)]
    if config:
        args += ["--config", config]
    for s in sets:
        args += ["--set", s]
    return run_ranks(k, args, timeout=timeout, PYTHONPATH=pythonpath(plugins), **env)


def records(out, event):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r.get("event") == event]


def final_params(out):
    return load_checkpoint(list_checkpoints(str(out))[0]).params  # the newest


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def assert_clean_exit(p, code):
    """Exit ``code`` with no abort and no traceback: every rank left on its own."""
    text = p.stdout + p.stderr
    assert p.returncode == code, text[-3000:]
    assert "Traceback" not in text and "MPI_Abort" not in text and "BAD TERMINATION" not in text, text[-3000:]


# ---------------------------------------------------------------------------- the README's example
def test_readme_lists_the_shipped_example():
    """The README's plug-in listing is zohpc/tasks/examples.py verbatim (the tests run that file)."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    m = re.search(r"<!-- listing: zohpc/tasks/examples.py -->\n```python\n(.*?)```\n", readme, re.S)
    assert m, "README: listing marker of zohpc/tasks/examples.py not found"
    with open(EXAMPLE) as fh:
        assert m.group(1) == fh.read()


@pytest.fixture(scope="module")
def regression_run(plugins, tmp_path_factory):
    """(a) The README's plug-in, as a user's module, on 2 ranks with configs/bring_your_own.toml."""
    out = tmp_path_factory.mktemp("a") / "run"
    p = train(2, plugins, out, "task.name=my_problem:regression", config=BYO)
    return p, out


def test_numpy_black_box_regression_trains(regression_run):
    """(a) An objective computed by numpy on detached outputs: the loss falls by half or more."""
    p, out = regression_run
    assert_clean_exit(p, 0)
    steps = records(out, "step")
    assert len(steps) == 160 and all(np.isfinite(s["loss"]) for s in steps)
    first, last = steps[0]["loss"], steps[-1]["loss"]
    evals = records(out, "eval")
    assert last <= 0.5 * first, (first, last)
    assert evals[-1]["test_loss"] <= 0.5 * first, (first, evals[-1]["test_loss"])
    assert evals[-1]["test_loss"] < 0.07  # the README's figure (0.058)
    assert set(evals[-1]["metrics"]) == {"mse", "mae"}
    # the summary's best of each metric: errors are minimized (their best is the last epoch's here)
    best = records(out, "done")[0]["best"]
    assert len(evals) > 1 and best["test_loss"] == min(e["test_loss"] for e in evals)
    for k in ("mse", "mae"):
        assert best[k] == min(e["metrics"][k] for e in evals) < evals[0]["metrics"][k]
    assert records(out, "start")[0]["task"] == "regression"
    assert "feature reuse off" not in p.stderr  # a traceable model in front of the black box


def test_plugin_gradient_bit_identical_across_rank_counts(plugins, regression_run, tmp_path):
    """(f) The same plug-in run on 1 rank ends with the very same parameters as on 2 (160 steps)."""
    _, out2 = regression_run
    out1 = tmp_path / "one"
    p = train(1, plugins, out1, "task.name=my_problem:regression", config=BYO)
    assert_clean_exit(p, 0)
    a, b = final_params(out1), final_params(out2)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [s["loss"] for s in records(out1, "step")] == [s["loss"] for s in records(out2, "step")]


# ---------------------------------------------------------------------------- (c) untraceable model
@pytest.fixture(scope="module")
def untraceable_run(plugins, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "run"
    sets = ("task.name=zoplug:untraceable", "prune.method=none", "train.epochs=2", "data.batch_size=32")
    return train(2, plugins, out, *sets), out, sets


def test_untraceable_model_trains_with_full_forwards(untraceable_run):
    """(c) Data-dependent Python control flow in forward: full forwards, one line saying why."""
    p, out, _ = untraceable_run
    assert_clean_exit(p, 0)
    said = [line for line in p.stderr.splitlines() if "feature reuse off" in line]
    assert len(said) == 1, p.stderr
    assert "torch.fx cannot trace model FixedPoint" in said[0] and "full forward" in said[0]
    steps = records(out, "step")
    assert len(steps) == 8
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"], [s["loss"] for s in steps]


def test_untraceable_model_bit_identical_across_rank_counts(plugins, untraceable_run, tmp_path):
    """(f) Full-forward CGE too: 1 rank and 2 ranks end with the same parameters."""
    _, out2, sets = untraceable_run
    p = train(1, plugins, tmp_path / "one", *sets)
    assert_clean_exit(p, 0)
    a, b = final_params(tmp_path / "one"), final_params(out2)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- (d) bad input
START_UP = {  # case: (--set, words of the one line); each before any heavy work (no run directory)
    "no_module": ("task.name=zoplug_nowhere:build", ["task.name", "zoplug_nowhere", "cannot import"]),
    "no_attribute": ("task.name=zoplug:nope", ["task.name", "zoplug", "has no 'nope'"]),
    "not_callable": ("task.name=zoplug:NOT_CALLABLE", ["task.name", "zoplug:NOT_CALLABLE", "not callable"]),
    "not_a_task": ("task.name=zoplug:not_a_task", ["zoplug:not_a_task", "returned dict", "not a zohpc.tasks.Task"]),
    "model_factory": ("model.name=zoplug:failing_model", ["zoplug:failing_model", "factory failed",
                                                          "no such layer size"]),
    "mismatched": ("task.name=zoplug:mismatched", ["zoplug:mismatched", "inputs (32) and targets (31)"]),
    "non_finite": ("task.name=zoplug:non_finite", ["zoplug:non_finite", "train inputs contain NaN"]),
    "wrong_shape": ("task.name=zoplug:wrong_shape", ["zoplug:wrong_shape", "loss returned an array of shape (8, 1)",
                                                      "before training"]),
    "exits_on_rank_1": ("task.name=zoplug:exits_on_rank_1", ["zoplug:exits_on_rank_1", "factory failed",
                                                             "sys.exit(3)"]),
    "late_labels": ("task.name=zoplug:late_labels", ["task 'zoplug:late_labels'", "train class labels must lie in [0, 3)",
                                                     "0..7"]),
}
IN_STEP = {  # the objective fails in step 3: the checkpoint of step 2 is kept
    "nan_late": ("task.name=zoplug:nan_late", ["task 'late'", "loss is nan", "(step 3)"]),
    "raises_late": ("task.name=zoplug:raises_late", ["task 'late'", "RuntimeError: solver diverged", "(step 3)"]),
    "exits_late": ("task.name=zoplug:exits_late", ["task 'late'", "sys.exit('the solver gave up')", "(step 3)"]),
    "exits_in_augment": ("task.name=zoplug:exits_in_augment", ["augment failed in epoch 0, batch 2", "sys.exit(3)"]),
}


EXTERNAL = {"external": "task.name=zoplug:external", "external_twin": "task.name=zoplug:external_twin"}


@pytest.fixture(scope="module")
def cli_runs(plugins, tmp_path_factory):
    """Every bad input and the external-program runs, each a full ``python -m zohpc.train``
    command line, in one 2-rank job (one start-up instead of fourteen)."""
    d = tmp_path_factory.mktemp("cli")
    cases = {name: ["--set", s, "--set", "prune.method=none", "--set", "data.batch_size=16", "--out",
                    str(d / name)] for name, (s, _) in {**START_UP, **IN_STEP}.items()}
    for name, s in EXTERNAL.items():
        cases[name] = ["--set", s, "--set", "prune.method=none", "--set", "train.epochs=2", "--out", str(d / name)]
    (d / "cases.json").write_text(json.dumps(cases))
    p = run_ranks(2, [os.path.join(SCRIPTS, "cli_cases.py"), str(d), str(d / "cases.json")], timeout=180,
                  PYTHONPATH=pythonpath(plugins), ZOPLUG_CALLS=str(d / "calls.txt"))
    assert_clean_exit(p, 0)
    ranks = [json.loads((d / f"rank-{r}.json").read_text()) for r in range(2)]
    return d, ranks


def test_objective_calling_an_external_program(cli_runs):
    """(b) Each perturbed copy's loss comes from another process (numbers on stdin, the loss on
    stdout), and the run follows the trajectory of the same objective written in torch."""
    d, ranks = cli_runs
    for name in EXTERNAL:
        assert [r[name]["code"] for r in ranks] == [0, 0], [r[name]["stderr"][-2000:] for r in ranks]
    ext, twin = records(d / "external", "step"), records(d / "external_twin", "step")
    assert len(ext) == 2 and ext[-1]["loss"] < ext[0]["loss"]
    assert [s["loss"] for s in ext] == pytest.approx([s["loss"] for s in twin], rel=1e-6)
    a, b = final_params(d / "external"), final_params(d / "external_twin")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), (name, a[name], b[name])
    pids = (d / "calls.txt").read_text().split()
    assert len(pids) >= sum(s["queries"] for s in ext) + len(ext)  # every query and base loss
    assert len(set(pids)) == len(pids)  # each in a fresh process


@pytest.mark.parametrize("case", sorted({**START_UP, **IN_STEP}))
def test_bad_input_exit_2_one_line_every_rank(cli_runs, case):
    """(d) Exit 2 on every rank, one line naming the task and the problem, printed once."""
    d, ranks = cli_runs
    words = {**START_UP, **IN_STEP}[case][1]
    assert [r[case]["code"] for r in ranks] == [2, 2], [r[case] for r in ranks]
    lines = error_lines(ranks[0][case]["stderr"]) + error_lines(ranks[1][case]["stderr"])
    assert len(lines) == 1, lines
    assert lines[0].startswith("zohpc.train: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    run_dir = d / case
    if case in START_UP:
        assert not run_dir.exists()  # before any heavy work: not even the run directory
    else:
        kept = list_checkpoints(str(run_dir))
        assert len(kept) == 1 and load_checkpoint(kept[0]).step == 2, kept


def test_bad_input_through_the_cli_itself(plugins, tmp_path):
    """(d) The same through ``mpiexec -n 2 python -m zohpc.train`` (mpiexec's own exit status)."""
    p = train(2, plugins, tmp_path / "late", "task.name=zoplug:nan_late", "prune.method=none", "data.batch_size=16")
    assert_clean_exit(p, 2)
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "(step 3)" in lines[0], p.stderr
    assert [load_checkpoint(c).step for c in list_checkpoints(str(tmp_path / "late"))] == [2]


@pytest.mark.parametrize("prune", ["none", "zo_grasp"])
def test_objective_failing_during_start_up_exits_2(plugins, tmp_path, prune):
    """The objective is fine at the probe (its first 2 calls) and NaN afterwards: the next
    calls are start-up work before step 1 (ZO-GraSP's queries, or the cost model's
    calibration). Run through cli_cases.py: a rank's exit code is only recorded if the rank
    was not aborted (MPI_Abort does not reliably print anything before mpiexec ends the job)."""
    case = ["--set", "task.name=zoplug:nan_after", "--set", f"prune.method={prune}", "--set", "data.batch_size=16",
            "--out", str(tmp_path / "run")]
    (tmp_path / "cases.json").write_text(json.dumps({"start_up": case}))
    p = run_ranks(2, [os.path.join(SCRIPTS, "cli_cases.py"), str(tmp_path), str(tmp_path / "cases.json")],
                  timeout=120, PYTHONPATH=pythonpath(plugins), ZOPLUG_NAN_AFTER=2)
    ranks = [tmp_path / f"rank-{r}.json" for r in range(2)]
    assert all(f.exists() for f in ranks), p.stderr[-2000:]  # both ranks ended on their own
    got = [json.loads(f.read_text())["start_up"] for f in ranks]
    assert [g["code"] for g in got] == [2, 2]
    lines = error_lines(got[0]["stderr"]) + error_lines(got[1]["stderr"])
    assert len(lines) == 1 and "task 'counted'" in lines[0] and "nan" in lines[0], lines


def test_bad_input_in_process_messages():
    """The checks themselves (no MPI): Dataset tasks, test data that differs from train data,
    metrics that fail, cross entropy without class labels."""
    from zohpc.tasks.examples import make_data, numpy_mse

    x, y = make_data(16, 4, 0.0, 0, "train")

    def net():
        return torch.nn.Linear(4, 1)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return x[i], y[i]

    ok = check_task(Task(model=net(), train=Pairs(), loss=numpy_mse), "ds")
    assert torch.equal(ok.train[0], x) and torch.equal(ok.train[1], y) and ok.name == "ds"
    cases = [
        (dict(train=(x, y), test=(x[:, :3], y), loss=numpy_mse), "test inputs have shape (3,) per example"),
        (dict(train=(x, y), loss=numpy_mse, metrics=lambda o, t: 3.0), "metrics failed"),
        (dict(train=(x, y), loss=None), "cross entropy over class labels"),
        (dict(train=(x[:, :3], y), loss=numpy_mse), "the model fails on 8 training inputs of shape (3,)"),
        (dict(train=(x, y), loss=lambda o, t: float("nan")), "loss is nan"),
        (dict(train=(x, y), loss=numpy_mse, batched_loss=lambda o, t: o.mean()), "batched_loss returned ()"),
        (dict(train=(x, y), loss="mse"), "loss is str, not callable"),
        (dict(train=[x, y, y], loss=numpy_mse), "must be (inputs, targets)"),
        (dict(train=(x, y), loss=numpy_mse, lower_is_better="mse"), "lower_is_better is 'mse', not a tuple"),
    ]
    for kwargs, words in cases:
        with pytest.raises(UserError, match=re.escape(words)) as info:
            check_task(Task(model=net(), **kwargs), "t")
        assert str(info.value).startswith("task 't': ") and "\n" not in str(info.value)


def test_metric_direction_by_declaration_or_name():
    t = Task(model=torch.nn.Linear(1, 1), train=None, lower_is_better=("margin",))
    assert t.minimizes("margin") and t.minimizes("test_loss") and t.minimizes("val_MSE") and t.minimizes("mae")
    assert not t.minimizes("accuracy") and not t.minimizes("success") and not Task(torch.nn.Linear(1, 1), None).minimizes("margin")


def test_task_options_from_the_config(tmp_path):
    """[task] options reach the factory, type-checked by task_options; unknown keys refused."""
    cfg = load_config(BYO, ["task.hidden=5", "task.objective=torch"], str(tmp_path / "r"))
    task = build_task(cfg)
    assert task.model[0].out_features == 5 and task.loss is None and task.batched_loss is not None
    for bad, words in (("task.hiden=5", "unknown option of task 'regression'"),
                       ("task.hidden=wide", "expected int"), ("task.objective=julia", "not 'numpy' or 'torch'")):
        with pytest.raises(UserError, match=re.escape(words)):
            build_task(load_config(BYO, [bad], str(tmp_path / "r")))


# ---------------------------------------------------------------------------- (e) gradients
def _float32_tolerance(f0, mu, central):
    """What float32 finite differences can promise: the rounding of two loss values (a few
    units of 2**-24 relative each, accumulated over the forward) divided by the step, plus the
    truncation (forward: mu |f2| / 2; central: mu**2 |f3| / 6, with the second and third
    derivatives f2, f3 bounded by 4 for this small tanh MLP on unit-scale data)."""
    rounding = 8 * 2.0 ** -24 * abs(f0) / mu
    return rounding + (2 * mu if not central else mu ** 2)


@pytest.mark.parametrize("difference,mu", [("central", 1e-2), ("forward", 1e-3)])
def test_cge_through_black_box_matches_float64_autograd(difference, mu):
    """(e) CGE with the numpy objective per copy, the batched torch objective and full forwards
    (untraceable path) equals autograd of the same objective written in torch, in float64."""
    from zohpc.tasks.examples import batched_mse, make_data, numpy_mse

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    x, y = make_data(48, 8, 0.05, 0, "train")
    ref = copy.deepcopy(model).double()
    ((ref(x.double()) - y.double()) ** 2).mean().backward()
    true = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    coords = Coordinates(model)
    engines = {"numpy per copy": QueryEngine(model, Objective(loss=numpy_mse, name="r"), query_batch=16),
               "torch batched": QueryEngine(model, Objective(batched=batched_mse, name="r"), query_batch=16),
               "full forwards": FullForwardEngine(model, Objective(loss=numpy_mse, name="r"), query_batch=16)}
    for kind, engine in engines.items():
        f0 = float(engine.prepare(x, y))
        g = cge(engine, coords, mu, difference).double()
        tol = _float32_tolerance(f0, mu, difference == "central")
        err = (g - true).abs().max().item()
        assert err <= tol, (kind, err, tol)
        assert err <= 0.02 * true.abs().max().item()  # and the tolerance is far below the gradient itself


# ---------------------------------------------------------------------------- (g) the Python API
@pytest.fixture(scope="module")
def api_runs(plugins, tmp_path_factory):
    """tests/scripts/api_script.py on 2 ranks: train 2 epochs, resume to 3, and a bad task."""
    d = tmp_path_factory.mktemp("g")
    script = os.path.join(SCRIPTS, "api_script.py")
    env = {"PYTHONPATH": pythonpath(plugins)}
    runs = {}
    for mode, epochs in (("train", 2), ("resume", 3), ("bad", 1)):
        out = d / ("bad" if mode == "bad" else "api")
        p = run_ranks(2, [script, mode, str(out), str(epochs)], timeout=120, **env)
        summaries = [json.loads((d / f"{out.name}.summary-{r}.json").read_text()) if p.returncode == 0 else None
                     for r in range(2)]
        runs[mode] = (p, summaries)
    return d, runs


def test_python_api_under_mpiexec_checkpoints_resume_exit_codes(api_runs):
    """(g) ``zohpc.run`` from a script on 2 ranks: a run directory with checkpoints, resume="auto"
    with more epochs continues it, the same summary on every rank; a user error exits 2."""
    d, runs = api_runs
    out = d / "api"
    p, first = runs["train"]
    assert_clean_exit(p, 0)
    assert first[0] == first[1] and first[0]["steps"] == 8 and first[0]["epochs"] == 2
    p, second = runs["resume"]
    assert_clean_exit(p, 0)
    assert second[0] == second[1] and second[0]["steps"] == 12 and second[0]["epochs"] == 3
    assert load_checkpoint(list_checkpoints(str(out))[0]).step == 12
    assert [r["step"] for r in records(out, "resume")] == [8]
    assert len(records(out, "step")) == 12  # steps 1-8, then 9-12 after the resume
    assert second[0]["final"]["test_loss"] < records(out, "step")[0]["loss"]  # it trains
    p, _ = runs["bad"]
    assert_clean_exit(p, 2)
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("zohpc.run: error: task 'api-regression': train inputs (256) "
                                                   "and targets (255)"), p.stderr
    assert not (d / "bad").exists()


def test_python_api_names_its_task_in_the_start_up_line(api_runs):
    _, runs = api_runs
    p, _ = runs["train"]
    assert "zohpc.run: task: api-regression" in p.stderr and "task: classify" not in p.stderr, p.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
