"""What rank 0 tells the person running the job: start-up phases with their durations, then
elapsed time, seconds per step, queries per second and an ETA (a tqdm bar on a terminal, the
same figures as a periodic line otherwise), and progress inside long steps."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Rank 0's console; every method is a no-op elsewhere."""

    def __init__(self, enabled: bool, every_seconds: float = 5.0, prog: str = "zohpc.train", stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.every = every_seconds
        self.prog = prog
        self.phases: dict[str, float] = {}
        self.bar = None
        self.last_line = 0.0
        self.t_loop = None
        self.steps_done = 0
        self.total = 0
        self.first_step = 0
        self.inner_last = 0.0

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def phase(self, name: str, what: str = ""):
        """Announce a start-up phase, time it, and report its duration."""
        self.say(f"{self.prog}: {name}{': ' + what if what else ''} ...")
        t0 = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - t0
        self.say(f"{self.prog}: {name} done in {self.phases[name]:.1f} s")

    # ---- the training loop ---------------------------------------------------------
    def start_loop(self, first_step: int, total_steps: int) -> None:
        self.t_loop = time.perf_counter()
        self.first_step = first_step
        self.total = total_steps
        self.steps_done = 0
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, file=self.stream, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def step(self, step: int, epoch: int, loss: float, lr: float, queries: int, seconds: float) -> None:
        if not self.enabled:
            return
        self.steps_done += 1
        elapsed = time.perf_counter() - self.t_loop
        per_step = elapsed / self.steps_done
        eta = per_step * (self.total - step)
        qps = queries / max(seconds, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"epoch {epoch} loss {loss:.4f} lr {lr:.3g} {qps:,.0f} q/s", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every or step == self.total or self.steps_done == 1:
            self.last_line = now
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.3g} | "
                  f"{per_step:.2f} s/step {qps:,.0f} queries/s | elapsed {_hms(elapsed)} ETA {_hms(eta)}",
                  file=self.stream, flush=True)

    def inside_step(self, step: int):
        """A callback(done, total, fraction) for the stacked passes of rank 0's shard (fraction:
        of the predicted cost): a line every 10 s while a long step runs (only the first step
        of a segment, before rates exist)."""
        if not self.enabled or self.steps_done > 0:
            return None
        t0 = time.perf_counter()
        self.inner_last = t0

        def report(done: int, total: int, fraction: float) -> None:
            now = time.perf_counter()
            if now - self.inner_last >= 10.0 and total and fraction > 0:
                self.inner_last = now
                eta = (now - t0) / fraction * (1.0 - fraction)
                self.say(f"step {step + 1}: {done}/{total} stacked passes of rank 0's shard "
                         f"({100.0 * fraction:.0f}% of its predicted work), {now - t0:.0f} s, step ETA {_hms(eta)}")
        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
