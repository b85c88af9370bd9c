"""``python -m zohpc.analyze``: summarize and compare runs offline, without MPI.

Inputs are run directories, checkpoint files (``zohpc-checkpoint``) and mask files
(``zohpc-masks``). For each: step, epoch, best and last test accuracy, loss, queries spent,
wall time, per-layer mask sparsity and per-parameter L2 norms. Several inputs give one
side-by-side table (plus the config keys in which they differ). ``--json`` prints one JSON
object (schema below, stable: keys are only ever added); ``--plot FILE.png`` draws loss
and test-accuracy curves (needs matplotlib: the ``plot`` extra).

JSON schema (``schema_version`` 1)::

    {"schema_version": 1,
     "runs": [{
        "path": str,                 # as given on the command line
        "name": str,                 # short label (base name) used as the table column
        "kind": "run" | "checkpoint" | "masks",
        "model": str | null,
        "ranks": int | null,
        "step": int | null,          # last step reached (step records / checkpoint)
        "epoch": int | null,
        "finished": bool,            # a "done" record was written
        "best_test_acc": float | null,
        "last_test_acc": float | null,
        "last_loss": float | null,   # loss of the last step record
        "queries": int | null,       # loss queries spent (done record, else sum of step records)
        "wall_seconds": float | null,# summed over segments: done record, else largest step/eval/stopped "time"
        "steps_logged": int,         # step records (the loss curve's length)
        "evals_logged": int,         # eval records (the accuracy curve's length)
        "checkpoint": str | null,    # checkpoint read (a run's newest one that verifies)
        "config": {section: {key: value}} | null,
        "masks": null | {"source": "checkpoint" | "mask file",
                         "sparsity": float,            # inactive / all masked entries
                         "layers": {name: {"sparsity": float, "numel": int}},
                         "method": str | null, "seed": int | null,
                         "requested_sparsity": float | null},
        "param_norms": {name: float},  # L2 norm of each parameter (checkpoint params)
        "param_norm_total": float | null,
        "warnings": [str]
     }, ...]}

Non-finite numbers (a diverged loss) are written as null, so the output is strict JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib

from . import metrics as m
from .errors import EXIT_USER_ERROR, CheckpointError, UserError
from .metrics import parse_record
from .plotting import PlotUnavailable, pyplot, save_figure  # noqa: F401 - PlotUnavailable re-exported

SCHEMA_VERSION = 1
PROG = "zohpc.analyze"

# --------------------------------------------------------------------------- reading
def read_metrics_jsonl(path: str, warnings: list[str]) -> list[dict]:
    """Records of a ``metrics.jsonl``; a damaged line (a job killed mid-write) is skipped with a warning."""
    records = []
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    warnings.append(f"{path}:{lineno}: not a JSON record; skipped")
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    warnings.append(f"{path}:{lineno}: not a JSON object; skipped")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return records


def _num(value):
    """A finite float/int, else None (JSON output stays strict)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _finite(value) -> bool:
    return _num(value) is not None


def curves(records: list[dict]) -> dict:
    """Loss per step and test accuracy per eval, one point per step (the last record wins)."""
    loss, acc = {}, {}
    for rec in map(parse_record, records):
        if isinstance(rec, m.Step) and _finite(rec.loss):
            loss[rec.step] = float(rec.loss)
        elif isinstance(rec, m.Eval) and _finite(rec.test_acc):
            acc[rec.step] = float(rec.test_acc)
    return {"loss_steps": sorted(loss), "loss": [loss[s] for s in sorted(loss)],
            "acc_steps": sorted(acc), "acc": [acc[s] for s in sorted(acc)]}


def _empty_summary(path: str, kind: str) -> dict:
    name = os.path.basename(os.path.normpath(path)) or path
    return {"path": path, "name": name, "kind": kind, "model": None, "ranks": None, "step": None, "epoch": None,
            "finished": False, "best_test_acc": None, "last_test_acc": None, "last_loss": None, "queries": None,
            "wall_seconds": None, "steps_logged": 0, "evals_logged": 0, "checkpoint": None, "config": None,
            "masks": None, "param_norms": {}, "param_norm_total": None, "warnings": []}


# records whose "time" counts seconds from their segment's start ("start" and "masks" carry
# the clock's epoch time, a date, which is no duration)
RELATIVE_TIME = ("step", "eval", "stopped")


def _apply_metrics(summary: dict, records: list[dict]) -> dict:
    """Fill a summary from metric records (typed by :mod:`zohpc.metrics`; unknown ones skipped)."""
    steps, done, segments = {}, None, [None]  # the longest time seen in each segment (a resume starts one)
    for obj in records:
        if obj.get("event") == "resume":
            segments.append(None)
        elif obj.get("event") in RELATIVE_TIME and _num(obj.get("time")) is not None:
            segments[-1] = max(float(obj["time"]), segments[-1] or 0.0)
        rec = parse_record(obj)
        if isinstance(rec, m.Start):
            summary["model"] = rec.model if isinstance(rec.model, str) else summary["model"]
            summary["ranks"] = _int(rec.ranks)
        elif isinstance(rec, m.Step) and _int(rec.step) is not None:
            steps[rec.step] = rec
        elif isinstance(rec, m.Done):
            done = rec
    c = curves(records)
    summary["steps_logged"], summary["evals_logged"] = len(c["loss"]), len(c["acc"])
    if steps:
        last = steps[max(steps)]
        summary["step"], summary["epoch"] = last.step, _int(last.epoch)
        summary["last_loss"] = _num(last.loss)
        summary["queries"] = sum(_int(r.queries) or 0 for r in steps.values())
    if c["acc"]:
        summary["best_test_acc"], summary["last_test_acc"] = max(c["acc"]), c["acc"][-1]
    if any(t is not None for t in segments):
        summary["wall_seconds"] = sum(t or 0.0 for t in segments)
    if done is not None:
        summary["finished"] = True
        for field in ("step", "epoch", "queries"):
            if _int(getattr(done, field)) is not None:
                summary[field] = getattr(done, field)
        if summary["best_test_acc"] is None:
            summary["best_test_acc"] = _num(done.best_test_acc)
        if summary["last_test_acc"] is None:
            summary["last_test_acc"] = _num(done.final_test_acc)
        if _num(done.wall_seconds) is not None:  # the last segment's, whole; earlier ones as seen
            summary["wall_seconds"] = sum(t or 0.0 for t in segments[:-1]) + float(done.wall_seconds)
    return summary


def _parse_config(text: str, source: str, warnings: list[str]):
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        warnings.append(f"{source}: config is not valid TOML ({exc}); ignored")
        return None
    return config


def _mask_summary(masks: dict, source: str) -> dict | None:
    if not masks:
        return None
    layers, inactive, total = {}, 0, 0
    for name, m in masks.items():
        numel = int(m.numel())
        off = int((~m.bool()).sum().item())
        layers[name] = {"sparsity": off / numel if numel else 0.0, "numel": numel}
        inactive += off
        total += numel
    return {"source": source, "sparsity": inactive / total if total else 0.0, "layers": layers,
            "method": None, "seed": None, "requested_sparsity": None}


def _apply_checkpoint(summary: dict, ck) -> None:
    summary["checkpoint"] = ck.path
    if summary["step"] is None or ck.step > summary["step"]:
        summary["step"], summary["epoch"] = ck.step, ck.epoch
    if summary["config"] is None:
        summary["config"] = _parse_config(ck.config_toml, ck.path, summary["warnings"])
    if summary["model"] is None and isinstance(summary["config"], dict):
        model = summary["config"].get("model", {}).get("name")
        summary["model"] = model if isinstance(model, str) else None
    norms = {}
    for name, p in ck.params.items():
        if p.is_floating_point() or p.is_complex():
            norms[name] = _num(float(p.detach().double().norm().item()))
    summary["param_norms"] = norms
    if norms and all(v is not None for v in norms.values()):
        summary["param_norm_total"] = math.sqrt(sum(v * v for v in norms.values()))
    summary["masks"] = _mask_summary(ck.masks, "checkpoint")


def summarize_checkpoint(path: str) -> dict:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    summary = _apply_metrics(_empty_summary(path, "checkpoint"), ck.metrics)
    summary["config"] = _parse_config(ck.config_toml, path, summary["warnings"])
    _apply_checkpoint(summary, ck)
    summary["step"], summary["epoch"] = ck.step, ck.epoch  # the checkpoint's own position
    return summary


def summarize_run_dir(path: str) -> dict:
    from .checkpoint import checkpoint_dir, find_resumable

    metrics_path = os.path.join(path, "metrics.jsonl")
    config_path = os.path.join(path, "config.toml")
    if not any(os.path.exists(p) for p in (metrics_path, config_path, checkpoint_dir(path))):
        raise UserError(f"{path}: not a zohpc run directory (no metrics.jsonl, config.toml or checkpoints/)")
    summary = _empty_summary(path, "run")
    warnings = summary["warnings"]
    if os.path.isfile(metrics_path):
        _apply_metrics(summary, read_metrics_jsonl(metrics_path, warnings))
    else:
        warnings.append(f"{metrics_path}: missing")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as fh:
                summary["config"] = _parse_config(fh.read(), config_path, warnings)
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(f"{config_path}: unreadable ({exc}); ignored")
    found = find_resumable(path, warn=warnings.append)
    if found is not None:
        _apply_checkpoint(summary, found[1])
    if summary["model"] is None and isinstance(summary["config"], dict):
        model = summary["config"].get("model", {}).get("name")
        summary["model"] = model if isinstance(model, str) else None
    return summary


def summarize_mask_file(path: str) -> dict:
    try:
        from .masks import read_mask_file
    except ImportError:
        raise UserError(f"{path}: is a mask file, but zohpc.masks is not available in this installation") from None
    mf = read_mask_file(path)
    summary = _empty_summary(path, "masks")
    summary["model"] = mf.model_name
    masks = _mask_summary(mf.masks, "mask file") or {"source": "mask file", "sparsity": 0.0, "layers": {}}
    masks.update(method=mf.method, seed=int(mf.seed), requested_sparsity=float(mf.sparsity))
    summary["masks"] = masks
    return summary


def _hdf5_format(path: str) -> str:
    """The ``format`` attribute of an HDF5 file, without exposing a damaged zohpc file to HDF5."""
    from .h5util import TRAILER_PREFIX, TRAILER_SIZE, verify_trailer

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sealed = False
        if size >= TRAILER_SIZE:
            fh.seek(size - TRAILER_SIZE)
            sealed = fh.read(TRAILER_SIZE).startswith(TRAILER_PREFIX)
    if sealed:  # a zohpc file: its whole-file checksum must hold before HDF5 reads it
        verify_trailer(path, "zohpc file")
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            found = fh.attrs.get("format", "")
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{path}: truncated or damaged HDF5 file") from None
    return found.decode() if isinstance(found, bytes) else str(found)


def summarize(path: str) -> dict:
    """Summary of one input (see the module docstring for the fields)."""
    if os.path.isdir(path):
        return summarize_run_dir(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head != b"\x89HDF\r\n\x1a\n":
        if path.endswith(".jsonl"):
            summary = _empty_summary(path, "run")
            return _apply_metrics(summary, read_metrics_jsonl(path, summary["warnings"]))
        raise UserError(f"{path}: not a run directory, checkpoint or mask file ({'empty file' if not head else 'not HDF5'})")
    fmt = _hdf5_format(path)
    if fmt == "zohpc-checkpoint":
        return summarize_checkpoint(path)
    if fmt == "zohpc-masks":
        return summarize_mask_file(path)
    raise CheckpointError(f"{path}: not a zohpc checkpoint or mask file (format attribute is {fmt or 'missing'!r})")


# --------------------------------------------------------------------------- output
def _labels(summaries: list[dict]) -> list[str]:
    names = [s["name"] for s in summaries]
    if len(set(names)) == len(names):
        return names
    return [f"[{i + 1}] {n}" for i, n in enumerate(names)]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if value == "":
        return '""'
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _flat_config(config) -> dict:
    flat = {}
    if isinstance(config, dict):
        for section, table in config.items():
            if isinstance(table, dict):
                for key, value in table.items():
                    flat[f"{section}.{key}"] = value
    return flat


def format_text(summaries: list[dict]) -> str:
    """Side-by-side tables: overview, differing config keys, mask sparsity, parameter norms."""
    labels = _labels(summaries)
    out = []
    fields = [("kind", "kind"), ("model", "model"), ("ranks", "ranks"), ("step", "step"), ("epoch", "epoch"),
              ("finished", "finished"), ("best test acc", "best_test_acc"), ("last test acc", "last_test_acc"),
              ("last loss", "last_loss"), ("queries", "queries"), ("wall seconds", "wall_seconds"),
              ("mask sparsity", None), ("mask method", "method"), ("param L2 norm", "param_norm_total"),
              ("checkpoint", "checkpoint")]
    rows = []
    for title, key in fields:
        if key is None:
            cells = [_fmt(s["masks"]["sparsity"]) if s["masks"] else "-" for s in summaries]
        elif key == "method":
            cells = [_fmt((s["masks"] or {}).get("method")) for s in summaries]
        elif key == "checkpoint":
            cells = [os.path.basename(s[key]) if s[key] else "-" for s in summaries]
        else:
            cells = [_fmt(s[key]) for s in summaries]
        rows.append([title, *cells])
    out.append(_table(["", *labels], rows))

    if len(summaries) > 1:
        flats = [_flat_config(s["config"]) if s["config"] is not None else None for s in summaries]
        known = [f for f in flats if f is not None]  # inputs without a config do not count as different
        keys = sorted(set().union(*known)) if len(known) > 1 else []
        diff = [[k, *["-" if f is None else _fmt(f.get(k)) for f in flats]]
                for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in known}) > 1]
        if diff:
            out.append("\nConfig differences:\n" + _table(["key", *labels], diff))

    layer_names = []
    for s in summaries:
        for name in (s["masks"] or {}).get("layers", {}):
            if name not in layer_names:
                layer_names.append(name)
    if layer_names:
        rows = [[name, *[_fmt(s["masks"]["layers"][name]["sparsity"]) if s["masks"] and name in s["masks"]["layers"]
                         else "-" for s in summaries]] for name in layer_names]
        rows.append(["(all masked)", *[_fmt(s["masks"]["sparsity"]) if s["masks"] else "-" for s in summaries]])
        out.append("\nMask sparsity per layer (fraction of inactive coordinates):\n" + _table(["layer", *labels], rows))

    param_names = []
    for s in summaries:
        for name in s["param_norms"]:
            if name not in param_names:
                param_names.append(name)
    if param_names:
        rows = [[name, *[_fmt(s["param_norms"].get(name)) for s in summaries]] for name in param_names]
        out.append("\nParameter L2 norms:\n" + _table(["parameter", *labels], rows))

    for label, s in zip(labels, summaries):
        for w in s["warnings"]:
            out.append(f"warning: {label}: {w}")
    return "\n".join(out) + "\n"


def to_json(summaries: list[dict]) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "runs": summaries}, indent=2, allow_nan=False)


def plot(summaries: list[dict], histories: list[list[dict]], out: str) -> None:
    """Loss per step (left) and test accuracy per eval (right), one line per run."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in zip(_labels(summaries), histories):
        c = curves(records)
        if c["loss"]:
            ax_loss.plot(c["loss_steps"], c["loss"], label=label, linewidth=1,
                         marker="." if len(c["loss"]) <= 50 else None)
        if c["acc"]:
            ax_acc.plot(c["acc_steps"], c["acc"], marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (minibatch)", title="Loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, out)
    except (OSError, ValueError) as exc:
        raise UserError(f"--plot {out}: cannot write ({exc})") from None
    finally:
        plt.close(fig)


def _history(summary: dict) -> list[dict]:
    """The metric records behind a summary (for plotting)."""
    path = summary["path"]
    if summary["kind"] == "run":
        metrics = path if os.path.isfile(path) else os.path.join(path, "metrics.jsonl")
        if os.path.isfile(metrics):
            return read_metrics_jsonl(metrics, [])
        return []
    if summary["kind"] == "checkpoint":
        from .checkpoint import load_checkpoint

        return load_checkpoint(path).metrics
    return []


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.analyze",
                                description="Summarize and compare zohpc run directories, checkpoints and mask files.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directory, checkpoint (.h5) or mask file (.h5)")
    p.add_argument("--json", action="store_true", help="print one JSON object {\"schema_version\": 1, \"runs\": [...]}")
    p.add_argument("--plot", metavar="FILE.png", help="draw loss and test-accuracy curves (needs matplotlib)")
    return p


def main(argv=None) -> int:
    """Entry point; user errors are one line on stderr and exit code 2. No MPI is started."""
    args = build_parser().parse_args(argv)
    try:
        if args.plot:
            pyplot()  # fail before any work
            parent = os.path.dirname(os.path.abspath(args.plot))
            if not os.path.isdir(parent):
                raise UserError(f"--plot {args.plot}: directory {parent} does not exist")
        summaries = [summarize(p) for p in args.paths]
        if args.json:
            print(to_json(summaries))
        else:
            sys.stdout.write(format_text(summaries))
        if args.plot:
            plot(summaries, [_history(s) for s in summaries], args.plot)
            if not args.json:
                print(f"plot written to {args.plot}")
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
