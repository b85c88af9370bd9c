"""LIZO (ReLIZO) optimizer: estimate, analytic Gram update, line search, state, ranks."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from zohpc.comm import world
from zohpc.optim import LIZO
from zohpc.optim.lizo import K_GRAM, K_POINTS, K_X

torch.set_num_threads(1)
D64 = torch.float64


def rosen(x):
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def bumpy(x):
    return (x ** 2).sum() + 0.3 * torch.sin(3.0 * x).sum() + 0.1 * (x ** 4).sum()


def make_param(d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(scale * torch.randn(d, dtype=D64, generator=g))


class CoordLIZO(LIZO):
    """Fresh directions are the coordinate axes (scaled), in order."""

    def sample_directions(self, k, dim):
        return torch.eye(dim, dtype=D64)[:k] * self.sample_norm


class DuplicateLIZO(LIZO):
    """Every fresh direction is the same: the Gram matrix is singular."""

    def sample_directions(self, k, dim):
        u = torch.zeros(dim, dtype=D64)
        u[0] = self.sample_norm
        return u.repeat(k, 1)


def test_coordinate_directions_give_forward_differences():
    d = 12
    x = make_param(d, 1)
    s = 1e-4
    opt = CoordLIZO([x], lr=0.01, num_sample_per_step=d, max_reuse_rate=0.0, sample_norm=s)
    x0 = x.detach().clone()
    f = lambda: bumpy(x)  # noqa: E731
    opt.step(f)
    fx = bumpy(x0)
    ref = torch.empty(d, dtype=D64)
    for i in range(d):
        y = x0.clone()
        y[i] += s
        ref[i] = (bumpy(y) - fx) / ((y - x0)[i])
    assert torch.allclose(opt.last_grad, ref, rtol=1e-11, atol=1e-12)
    # and the move is -lr * g exactly
    assert torch.allclose(x.detach(), x0 - 0.01 * ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [1, 3, 7, 20])
def test_linear_function_gives_projection_onto_sampled_span(n):
    d = 20
    a = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(n))
    x = make_param(d, 2)
    opt = LIZO([x], lr=0.05, num_sample_per_step=n, sample_norm=0.3, reuse_distance_bound=10.0, seed=n)
    for _ in range(6):  # later steps reuse earlier points: still exact on a linear function
        opt.step(lambda: a @ x + 1.5)
        v = opt.last_offsets
        q, _ = torch.linalg.qr(v.T)
        proj = q @ (q.T @ a)
        assert torch.allclose(opt.last_grad, proj, rtol=1e-9, atol=1e-10 * a.norm().item())
    assert opt.counters()["reused"] > 0 or n < 2  # floor(0.5 * 1) = 0 rows may be reused


@pytest.mark.parametrize("orthogonal", [False, True])
def test_analytic_gram_equals_recomputed(orthogonal):
    d = 30
    x = make_param(d, 3, 0.5)
    opt = LIZO([x], lr=2e-3, num_sample_per_step=6, sample_norm=1e-3, max_reuse_rate=0.5,
               orthogonal_sample=orthogonal, history_size=20, seed=4, reuse_distance_bound=0.2)
    longest = 0
    for _ in range(60):
        opt.step(lambda: rosen(x))
        st = opt.state[x]
        off = st[K_POINTS].double() - st[K_X].double()
        assert torch.equal(st[K_X], x.detach())
        assert torch.allclose(st[K_GRAM], off @ off.T, rtol=0, atol=1e-10)
        v = opt.last_offsets
        assert torch.allclose(opt.last_gram, v @ v.T, rtol=0, atol=1e-10)
        longest = max(longest, st[K_POINTS].shape[0])
    c = opt.counters()
    assert c["reused"] > 60 and longest > 7  # reuse happened and older points were kept
    # the recomputing variant follows the same trajectory (to rounding)
    y = make_param(d, 3, 0.5)
    ref = LIZO([y], lr=2e-3, num_sample_per_step=6, sample_norm=1e-3, max_reuse_rate=0.5,
               orthogonal_sample=orthogonal, history_size=20, seed=4, recompute_gram=True,
               reuse_distance_bound=0.2)
    for _ in range(60):
        ref.step(lambda: rosen(y))
    assert torch.allclose(x.detach(), y.detach(), rtol=0, atol=1e-8)
    assert ref.counters()["reused"] == c["reused"]


def test_reuse_bound_zero_means_no_reuse_and_none_or_negative_means_twice_lr():
    d = 10
    runs = {}
    for bound in (0.0, None, -1.0, 0.5):
        x = make_param(d, 5, 0.1)
        opt = LIZO([{"params": [x], "lr": 0.01}], lr=0.02, num_sample_per_step=4, reuse_distance_bound=bound,
                   sample_norm=1e-3, seed=2)
        for _ in range(8):
            opt.step(lambda: bumpy(x))
        runs[bound] = (opt.distance_bound(), opt.counters())
    assert runs[0.0][0] == 0.0 and runs[0.0][1]["reused"] == 0 and runs[0.0][1]["fresh"] == 8 * 4
    assert runs[None][0] == runs[-1.0][0] == 2 * 0.01  # the largest group lr
    assert runs[None][1] == runs[-1.0][1] and runs[None][1]["reused"] > 0
    assert runs[0.5][0] == 0.5 and runs[0.5][1]["reused"] > 0


def test_default_sample_norm_is_the_reference_offset_length():
    x = make_param(50, 1)
    assert LIZO([x], lr=0.1).sample_norm == pytest.approx(1e-5 * 50 ** 0.5, rel=1e-15)
    assert LIZO([x], lr=0.1, sample_norm=0.02).sample_norm == 0.02


def test_rows_of_very_different_lengths_are_not_ill_conditioned():
    """A reused row 1e5 times longer than the fresh ones is a well-posed system (angles matter,
    not lengths): no fallback, and the estimate is still exact on a linear function."""
    d = 12
    a = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(9))
    x = make_param(d, 7)
    opt = LIZO([x], lr=0.01, num_sample_per_step=4, max_reuse_rate=0.25, sample_norm=1e-7,
               reuse_distance_bound=1.0, seed=4)
    for _ in range(6):
        opt.step(lambda: a @ x)
        lengths = opt.last_offsets.norm(dim=1)
        q, _ = torch.linalg.qr(opt.last_offsets.T)
        assert torch.allclose(opt.last_grad, q @ (q.T @ a), rtol=0, atol=1e-6 * a.norm().item())
    assert lengths.max() / lengths.min() > 1e4
    c = opt.counters()
    assert c["reused"] == 5 and c["fallbacks"] == 0 and c["pinv_solves"] == 0


def test_external_parameter_change_reanchors_history():
    d = 10
    x = make_param(d, 5)
    opt = LIZO([x], lr=0.01, num_sample_per_step=4, sample_norm=1e-2)
    for _ in range(3):
        opt.step(lambda: bumpy(x))
    with torch.no_grad():
        x.add_(0.003)
    opt.step(lambda: bumpy(x))
    st = opt.state[x]
    off = st[K_POINTS].double() - st[K_X].double()
    assert torch.allclose(st[K_GRAM], off @ off.T, rtol=0, atol=1e-12)


FUNCS = {
    "sphere": lambda x: (x ** 2).sum(),
    "rosen": rosen,
    "bumpy": bumpy,
    "abs": lambda x: x.abs().sum() + 0.5 * x.max(),
    # a loss whose estimates are mostly wrong: the search must refuse to move uphill
    "noisy": lambda x: (x ** 2).sum() + 0.05 * torch.sin(1e4 * x).sum(),
}


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_line_search_never_raises_the_loss(name):
    fn = FUNCS[name]
    moved = refused = 0
    for seed in range(8):
        d = 5 + 3 * seed
        x = make_param(d, seed)
        lr = [0.01, 0.3, 3.0][seed % 3]
        wd = 0.1 if seed % 4 == 1 else 0.0
        opt = LIZO([x], lr=lr, num_sample_per_step=4, line_search=True, ls_max_backtracks=6,
                   weight_decay=wd, sample_norm=1e-3, seed=seed)
        big_f = lambda z: float(fn(z)) + 0.5 * wd * float(z @ z)  # noqa: E731
        for _ in range(15):
            before = x.detach().clone()
            f_before = big_f(before)
            opt.step(lambda: fn(x))
            f_after = big_f(x.detach())
            tau = opt.last_step_stats["line_search_accepted"]
            if tau is None:
                assert torch.equal(x.detach(), before)
                refused += 1
            else:
                moved += 1
                g = opt.last_grad + wd * before
                slope = float(g @ (lr * g))
                assert f_after < f_before
                assert f_after <= f_before - opt.ls_c * tau * slope + 1e-12 * abs(f_before)
    assert moved > 0
    if name == "noisy":
        assert refused > 0


def test_state_dict_round_trip_is_bit_identical():
    torch.manual_seed(0)
    data = torch.randn(40, 6)
    target = torch.randint(0, 3, (40,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    loss_fn = torch.nn.CrossEntropyLoss()

    def build(m):
        groups = [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}]
        return LIZO(groups, lr=0.05, num_sample_per_step=5, sample_norm=5e-3, line_search=True,
                    weight_decay=1e-3, seed=7)

    opt = build(model)
    closure = lambda m: (lambda: loss_fn(m(data), target))  # noqa: E731
    for _ in range(5):
        opt.step(closure(model))
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    for _ in range(5):
        opt.step(closure(model))
    model2 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model2.load_state_dict(saved_model)
    opt2 = build(model2)
    opt2.load_state_dict(saved_opt)
    for _ in range(5):
        opt2.step(closure(model2))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.counters() == opt2.counters()
    assert opt.counters()["reused"] > 0
    assert opt.state[next(model.parameters())][K_GRAM].dtype == D64


def test_param_groups_use_their_own_lr():
    a, b = make_param(6, 1), make_param(4, 2)
    opt = LIZO([{"params": [a]}, {"params": [b], "lr": 0.003}], lr=0.1, num_sample_per_step=5, seed=1)
    f = lambda: bumpy(torch.cat([a, b]))  # noqa: E731
    for _ in range(3):
        a0, b0 = a.detach().clone(), b.detach().clone()
        opt.step(f)
        g = opt.last_grad
        assert torch.allclose(a.detach(), a0 - 0.1 * g[:6], rtol=0, atol=1e-15)
        assert torch.allclose(b.detach(), b0 - 0.003 * g[6:], rtol=0, atol=1e-15)
        assert g[:6].abs().sum() > 0 and g[6:].abs().sum() > 0


def test_weight_decay_is_l2_on_the_step():
    x = make_param(5, 3)
    opt = LIZO([x], lr=0.1, weight_decay=0.5, num_sample_per_step=3)
    x0 = x.detach().clone()
    opt.step(lambda: torch.zeros((), dtype=D64))  # flat loss: only the decay moves x
    assert torch.allclose(x.detach(), x0 - 0.1 * 0.5 * x0, rtol=0, atol=1e-15)


def test_singular_gram_falls_back_and_gives_a_finite_step():
    x = make_param(8, 4)
    opt = DuplicateLIZO([x], lr=0.01, num_sample_per_step=4, sample_norm=1e-3, reuse_distance_bound=1.0)
    for _ in range(3):
        opt.step(lambda: bumpy(x))
        assert torch.isfinite(x).all()
        assert torch.isfinite(opt.last_grad).all() and opt.last_grad.abs().sum() > 0
    c = opt.counters()
    assert c["pinv_solves"] >= 1 and c["fallbacks"] >= 1


def test_nan_loss_leaves_parameters_and_counts_failure():
    x = make_param(5, 4)
    opt = LIZO([x], lr=0.01, num_sample_per_step=3)
    opt.step(lambda: bumpy(x))
    before = x.detach().clone()
    opt.step(lambda: torch.tensor(float("nan")))
    assert torch.equal(x.detach(), before)
    assert opt.counters()["failed_steps"] == 1
    opt.step(lambda: bumpy(x))  # and it carries on
    assert torch.isfinite(x).all() and not torch.equal(x.detach(), before)


def test_size_one_comm_matches_no_comm():
    out = []
    for comm in (None, world()):
        x = make_param(9, 6)
        opt = LIZO([x], lr=0.01, num_sample_per_step=5, comm=comm, line_search=True, seed=3)
        for _ in range(10):
            opt.step(lambda: rosen(x))
        out.append(x.detach().clone())
    assert torch.equal(out[0], out[1])


SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from zohpc.comm import world
    from zohpc.data import load_digits_raw, normalize
    from zohpc.models import build_model
    from zohpc.optim import LIZO

    MODES = {  # name: (LIZO options, steps)
        "plain": (dict(lr=0.05, reuse_distance_bound=1.0), 10),
        # a high gram_rcond calls every system with reused rows ill-conditioned: fallback re-queries
        "fallback_ls": (dict(lr=0.5, reuse_distance_bound=1.0, gram_rcond=1e-2, line_search=True,
                             ls_max_backtracks=5, weight_decay=1e-3), 8),
    }


    class Contrarian(LIZO):
        \"\"\"A worker whose own arithmetic decides everything the other way: it must not matter.\"\"\"

        def _choose_reuse(self, st, bound, r_max):
            return super()._choose_reuse(st, bound, r_max)[:0]

        def _solve(self, gram, rhs, dim):
            return None, False

        def _accept(self, big_f, big_f0, tau, slope):
            return True


    def problem():
        splits = normalize(load_digits_raw())
        x, y = splits.train_x[:96], splits.train_y[:96]
        torch.manual_seed(0)
        model = build_model("digits_cnn", splits.input_shape, 10)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0  # batch statistics in every query, running statistics untouched
        model.train()
        return model, x, y


    def run(comm, contrarian=False):
        out = {}
        for mode, (opts, steps) in MODES.items():
            model, x, y = problem()
            cls = Contrarian if contrarian and comm is not None and comm.rank > 0 else LIZO
            opt = cls(model.parameters(), num_sample_per_step=6, sample_norm=5e-3, comm=comm, seed=3, **opts)
            closure = lambda: torch.nn.functional.cross_entropy(model(x), y)
            losses = [opt.step(closure) for _ in range(steps)]
            out[mode] = {"params": [p.detach().clone() for p in model.parameters()], "losses": losses,
                         "c": opt.counters()}
        return out


    if __name__ == "__main__":
        comm = world()
        comm.set_threads()  # ZOHPC_THREADS: ranks may run different thread counts
        result = run(comm, contrarian=sys.argv[2] == "contrarian")
        result["threads"] = torch.get_num_threads()
        threads = comm.gather_floats([float(torch.get_num_threads())])
        if comm.rank == 0:
            result["threads"] = threads[:, 0].tolist()
            torch.save(result, sys.argv[1])
    """
)


def _mpiexec():
    path = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(path):
        pytest.skip("mpiexec not found")
    return path


def test_ranks_with_different_threads_and_contrary_arithmetic_follow_one_rank(tmp_path):
    """Digits CNN under 2 ranks with 1 and 2 threads (MPMD), and under 3 ranks whose workers
    take every local decision the other way: both finish and match the single process bit for bit."""
    script = tmp_path / "run_lizo.py"
    script.write_text(SCRIPT)
    namespace = {"__name__": "lizo_script"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    base = namespace["run"](None)
    env = dict(os.environ, OMP_NUM_THREADS="1", ZOHPC_THREADS="1")
    py = [sys.executable, str(script)]
    cmds = {
        "threads_1_2": [_mpiexec(), "-n", "1", "-env", "ZOHPC_THREADS", "1", *py, str(tmp_path / "a.pt"), "plain",
                        ":", "-n", "1", "-env", "ZOHPC_THREADS", "2", "-env", "OMP_NUM_THREADS", "2", *py,
                        str(tmp_path / "a.pt"), "plain"],
        "contrarian_3": [_mpiexec(), "-n", "3", *py, str(tmp_path / "b.pt"), "contrarian"],
    }
    procs = {k: subprocess.Popen(cmd, env=env) for k, cmd in cmds.items()}  # both at once: start-up dominates
    try:
        for k, proc in procs.items():
            assert proc.wait(timeout=180) == 0, f"{k} failed"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    results = {"threads_1_2": torch.load(tmp_path / "a.pt"), "contrarian_3": torch.load(tmp_path / "b.pt")}
    assert results["threads_1_2"]["threads"] == [1.0, 2.0]
    for name, result in results.items():
        for mode in ("plain", "fallback_ls"):
            got, ref = result[mode], base[mode]
            assert got["losses"] == ref["losses"], (name, mode)
            for p, q in zip(got["params"], ref["params"]):
                assert torch.equal(p, q), (name, mode)
            c_ref, c_got = dict(ref["c"]), dict(got["c"])
            if mode == "fallback_ls":  # trials are evaluated `size` at a time: only the query counts differ
                for key in ("queries", "line_search_queries"):
                    c_ref.pop(key), c_got.pop(key)
            assert c_got == c_ref, (name, mode)
    c_plain, c_ls = base["plain"]["c"], base["fallback_ls"]["c"]
    assert c_plain["reused"] > 0 and c_plain["fallbacks"] == 0
    assert c_ls["fallbacks"] > 0 and c_ls["line_search_queries"] > 0
    assert base["plain"]["losses"][-1] < base["plain"]["losses"][0]


def test_orthogonal_directions_are_orthonormal_and_blocks_are_contiguous():
    from zohpc.sharding import contiguous_split

    x = make_param(12, 8)
    opt = LIZO([x], lr=0.01, num_sample_per_step=5, orthogonal_sample=True, sample_norm=0.02)
    rows = opt.sample_directions(5, 12)
    assert torch.allclose(rows @ rows.T, 0.02 ** 2 * torch.eye(5, dtype=D64), rtol=0, atol=1e-15)
    plain = LIZO([x], lr=0.01, sample_norm=0.02).sample_directions(4, 12)
    assert torch.allclose(plain.norm(dim=1), torch.full((4,), 0.02, dtype=D64), rtol=1e-14)
    assert contiguous_split(7, 3) == [0, 2, 4, 7] and contiguous_split(2, 3) == [0, 0, 1, 2]
    with pytest.raises(ValueError):
        LIZO([x], lr=0.01, max_reuse_rate=1.5)
