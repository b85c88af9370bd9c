"""``peft_finetune``: ReLIZO's parameter-efficient fine-tuning application in miniature.

1. A small Llama (Hugging Face ``transformers``, built from a config) is pretrained by
   backprop (Adam, next-word loss) on documents of the synthetic language of
   :mod:`zohpc.tasks.language` (adjective sentiments agree with the document's hidden one
   with probability ``agreement``), and saved with its tokenizer to ``OUT/base`` (rank 0);
   every rank loads it from there, as the ``hf`` task loads any local model. Its init std is
   0.2: from Hugging Face's 0.02 this tiny model stays on the context-free plateau (next-word
   guesses from position alone, sentiment never learned: the LM probe stayed at chance).
   ``pretrain.probe_accuracy``: the pretrained LM on its own prompt (``the film was``).
2. The downstream task: that language's reviews, label = the majority sentiment, read as the
   next-word logits of ``bad`` / ``good`` after the prompt ``verdict :``, which pretraining
   never showed (prompt-based, as MeZO fine-tunes). ``zero_shot`` is the pretrained model on
   that prompt: the floor (it answers one class: the floor is that class's share).
3. LoRA adapters (rank 4) on ``q_proj`` and ``v_proj`` (1,024 values); only they train, by
   ``fo`` (Adam, backprop: the upper bound), ``spsa`` (MeZO's estimator), ``lizo`` (ReLIZO with
   query reuse) and ``lizo_no_reuse`` (reuse bound 0), the ZO methods by ``zohpc.run`` over
   all ranks, each stopped at the same budget of loss queries (every forward a method asks
   for counts, LIZO's base query included). LIZO's queries per step depend on how many rows
   it reuses, so its run is extended by exact resumes until the next step would pass the budget.
   Every step sees the same ``train_size`` reviews (full batch): the objective is one
   function, as LIZO's reuse of earlier losses assumes (with minibatches a reused loss is of
   another batch). The learning rates come from :func:`sweep` on the validation split;
   the table's accuracy is on the test split.

Goals (the issue): every ZO method above the floor; LIZO with reuse at least SPSA's accuracy
at equal queries (ReLIZO's claim).
"""

from __future__ import annotations

import json
import os
import time

import torch

from ..data import epoch_batches

from ..plotting import figure

PAPER = {"source": "ReLIZO (NeurIPS 2024): parameter-efficient fine-tuning of LLMs as an application; "
                   "MeZO (SPSA) as the ZO baseline",
         "claim": "LIZO with reuse >= SPSA at equal queries; every ZO method above zero-shot"}

FULL = {"docs": 2000, "pretrain_epochs": 8, "pretrain_lr": 3e-3, "init_std": 0.2, "agreement": 0.9,
        "pretrain_batch": 64,
        "hidden": 32, "layers": 2, "heads": 4,
        "train_size": 64, "val_size": 512, "test_size": 1024, "budget": 6000, "rank": 4, "alpha": 8.0,
        "fo_steps": 600, "fo_lr": 1e-2, "spsa_lr": 5e-3, "spsa_queries": 2, "lizo_lr": 2.0, "lizo_n": 8,  # val sweeps
        "mu": 1e-3, "seed": 0}
QUICK = dict(FULL, docs=300, pretrain_epochs=1, val_size=128, test_size=128, budget=120, fo_steps=4)
TARGET = "q_proj|v_proj"


def settings(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


def _spsa_overrides(s) -> list[str]:
    return ["zo.estimator=spsa", f"zo.spsa_queries={s['spsa_queries']}"]


def pretrain(s: dict, path: str) -> dict:
    """Pretrain the LM by backprop on the language's documents; save model and tokenizer to ``path``."""
    from ..tasks import language
    from ..tasks.hf import build_lm

    tok = language.tokenizer()
    ids = language.encode(tok, language.documents(s["docs"], s["seed"], agreement=s["agreement"]))
    lm = build_lm(len(tok), s["hidden"], s["layers"], s["heads"], seed=s["seed"], init_std=s["init_std"])
    opt = torch.optim.Adam(lm.parameters(), lr=s["pretrain_lr"])
    lm.train()
    t0 = time.perf_counter()
    loss = float("nan")
    for epoch in range(s["pretrain_epochs"]):
        for idx in epoch_batches(ids.shape[0], s["pretrain_batch"], s["seed"], epoch):
            out = lm(input_ids=ids[idx], labels=ids[idx], use_cache=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            loss = float(out.loss.detach())
    lm.eval()
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return {"lm_loss": loss, "seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in lm.parameters()),
            "probe_accuracy": lm_probe(lm, tok, s)}


@torch.no_grad()
def lm_probe(lm, tok, s: dict) -> float:
    """Did pretraining learn the language's sentiment? The LM's own prompt: a test review with
    ``the film was`` in place of ``verdict :``, read as ``good`` vs ``bad`` (no fine-tuning)."""
    from ..tasks import language
    from ..tasks.hf import PromptClassifier, label_ids

    texts, y = language.reviews(s["test_size"], s["seed"], "test")
    native = [" ".join(t.split()[:-len(language.PROMPT)] + ["the", "film", "was"]) for t in texts]
    return accuracy(PromptClassifier(lm, label_ids(tok, language.LABEL_WORDS)), language.encode(tok, native), y)


def load_task(s: dict, base: str):
    """The task on a fresh copy of the base, with the held-out splits ``val`` (lr tuning) and
    ``test`` (the table) kept aside: ``task.test`` is None, so zohpc.run evaluates nothing
    (with full-batch steps every step is an epoch) and the study evaluates once at the end."""
    from ..tasks import language
    from ..tasks.hf import load_pretrained, make_task

    lm, tok = load_pretrained(base)
    task = make_task(lm, tok, s["train_size"], s["test_size"], s["seed"], name="peft_finetune")
    texts, y = language.reviews(s["val_size"], s["seed"], "val")
    task.info["splits"] = {"val": (language.encode(tok, texts), y), "test": task.test}
    task.test = None
    return task


def held_out(task) -> dict:
    """Accuracy on the validation and test splits."""
    return {"val_accuracy": accuracy(task.model, *task.info["splits"]["val"]),
            "accuracy": accuracy(task.model, *task.info["splits"]["test"])}


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def _common(s: dict) -> list[str]:
    return [f"lora.target={TARGET}", f"lora.rank={s['rank']}", f"lora.alpha={s['alpha']}", "prune.method=none",
            "optim.schedule=constant", "optim.momentum=0.0", f"zo.mu={s['mu']}", f"data.batch_size={s['train_size']}",
            "train.epochs=1000000", f"train.seed={s['seed']}", "checkpoint.every_epochs=0", "data.test_batch_size=4096",
            "train.log_every_seconds=60"]


def zo_method(s: dict, base: str, overrides: list[str], out: str, max_per_step: int) -> dict:
    """Train LoRA adapters by zohpc.run until the next step could pass the query budget.

    ``max_per_step``: the most queries one step can take (SPSA: its directions plus the base
    loss; LIZO: its samples plus the base, fewer when it reuses). Each segment runs as many
    steps as surely fit in the room left, so the budget is never passed; while room for a
    step is left, the run resumes (bit for bit) with a higher ``train.max_steps``."""
    import zohpc

    task = load_task(s, base)
    steps, summary, resume = max(1, int(s["budget"] // max_per_step)), None, None
    t0 = time.perf_counter()
    for _ in range(8):
        summary = zohpc.run(task, overrides=_common(s) + overrides + [f"train.max_steps={steps}"], out=out,
                            resume=resume)
        more = (s["budget"] - int(summary["queries"])) // max_per_step
        if more < 1:
            break
        steps, resume = summary["steps"] + more, "auto"
    result = {**held_out(task), "queries": int(summary["queries"]), "steps": int(summary["steps"]),
              "seconds": time.perf_counter() - t0}
    counters = summary.get("optimizer_counters")
    if counters:  # LIZO: how many interpolation rows came from earlier queries
        rows = counters["reused"] + counters["fresh"]
        result["reuse_rate"] = counters["reused"] / rows if rows else 0.0
        result["fallbacks"] = counters["fallbacks"]
    return result


def fo_method(s: dict, base: str) -> dict:
    """Adam on the same adapters by backprop (the upper bound), on the same training examples
    (full batch: ``fo_steps`` epochs of one step)."""
    import torch.nn.functional as F

    from ..config import load_config
    from ..lora import apply_lora
    from ._common import train_backprop

    task = load_task(s, base)
    cfg = load_config(None, _common(s), None)
    apply_lora(task.model, cfg.lora, s["seed"])
    x, y = task.train
    secs = train_backprop(task.model, x, y, F.cross_entropy, epochs=s["fo_steps"], batch_size=x.shape[0],
                          lr=s["fo_lr"], seed=s["seed"])
    return {**held_out(task), "steps": s["fo_steps"], "seconds": secs}


def run(comm, out_dir: str, quick: bool) -> dict:
    s = settings(quick)
    comm.set_threads()
    base = os.path.join(out_dir, "base")
    pre = None
    if comm.is_driver:
        pre = pretrain(s, base)
    comm.barrier()
    task = load_task(s, base)
    methods = {"zero_shot": held_out(task)}
    runs = os.path.join(out_dir, "runs")
    if comm.is_driver and os.path.isdir(runs):
        import shutil

        shutil.rmtree(runs)  # the study's own scratch runs of an earlier invocation
    comm.barrier()
    spsa = _spsa_overrides(s)
    methods["spsa"] = zo_method(s, base, spsa + ["optim.name=sgd", f"optim.lr={s['spsa_lr']}"],
                                os.path.join(runs, "spsa"), s["spsa_queries"] + 1)
    lizo = ["optim.name=lizo", f"optim.lr={s['lizo_lr']}", f"optim.num_sample_per_step={s['lizo_n']}"]
    methods["lizo"] = zo_method(s, base, lizo + ["optim.reuse_distance_bound=-1"], os.path.join(runs, "lizo"),
                                s["lizo_n"] + 1)
    methods["lizo_no_reuse"] = zo_method(s, base, lizo + ["optim.reuse_distance_bound=0"],
                                         os.path.join(runs, "lizo_no_reuse"), s["lizo_n"] + 1)
    methods["fo"] = fo_method(s, base) if comm.is_driver else {}
    floor = methods["zero_shot"]["accuracy"]
    zo = ("spsa", "lizo", "lizo_no_reuse")
    goals = {"zo_above_floor": all(methods[m]["accuracy"] > floor for m in zo),
             "lizo_at_least_spsa": methods["lizo"]["accuracy"] >= methods["spsa"]["accuracy"]}
    return {"methods": methods, "goals": goals, "pretrain": pre, "settings": s, "ranks": comm.size}


def table(result: dict) -> str:
    m, s, g = result["methods"], result["settings"], result["goals"]
    rows = [("method", "test acc", "val acc", "queries", "steps", "reuse")]
    for key in ("zero_shot", "fo", "spsa", "lizo", "lizo_no_reuse"):
        r = m.get(key, {})
        rows.append((key, f"{100 * r.get('accuracy', float('nan')):.1f}", f"{100 * r.get('val_accuracy', float('nan')):.1f}",
                     f"{r['queries']:,}" if "queries" in r else "-", str(r.get("steps", "-")),
                     f"{100 * r['reuse_rate']:.0f}%" if "reuse_rate" in r else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    pre = result.get("pretrain") or {}
    lines = [f"peft_finetune: LoRA r={s['rank']} on {TARGET} of a {s['layers']}-layer Llama (hidden {s['hidden']}) "
             f"pretrained on the synthetic language; budget {s['budget']:,} queries, full batch of {s['train_size']} reviews"]
    if "probe_accuracy" in pre:
        lines.append(f"pretrained LM on its own prompt ('the film was'): {100 * pre['probe_accuracy']:.1f}% "
                     f"(zero-shot on the prompt it was pretrained on; 'verdict :' is new to it)")
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"goal: every ZO method above zero-shot ({100 * m['zero_shot']['accuracy']:.1f}): "
                 f"{'met' if g['zo_above_floor'] else 'NOT met'}")
    lines.append(f"goal: LIZO with reuse >= SPSA at equal queries: {'met' if g['lizo_at_least_spsa'] else 'NOT met'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    keys = ["zero_shot", "fo", "spsa", "lizo", "lizo_no_reuse"]
    with figure(path, 1, (6.4, 3.6)) as (fig, ax):
        ax.bar(keys, [100 * result["methods"].get(k, {}).get("accuracy", 0.0) for k in keys],
               color=["grey", "k", "C0", "C1", "C2"])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("LoRA fine-tuning at equal query budget")
        ax.set_ylim(0, 100)
        fig.tight_layout()




SWEEP = {"spsa": (2.5e-3, 5e-3, 1e-2, 2e-2), "lizo": (1.0, 2.0, 3.0), "fo": (3e-3, 1e-2, 3e-2)}


def sweep(comm, out_dir: str, budget: int, methods=("spsa", "lizo", "fo")) -> list[dict]:
    """The learning-rate sweep the settings come from: each method at each lr of ``SWEEP``,
    ``budget`` queries (FO: ``fo_steps``), scored on the **validation** split (the test split
    stays unseen). Reuses ``OUT/base`` when a study already pretrained it there."""
    s = dict(FULL, budget=budget)
    comm.set_threads()
    base = os.path.join(out_dir, "base")
    if comm.is_driver and not os.path.isfile(os.path.join(base, "config.json")):
        pretrain(s, base)
    comm.barrier()
    rows = []
    for method in methods:
        for lr in SWEEP[method]:
            if method == "fo":
                r = fo_method(dict(s, fo_lr=lr), base) if comm.is_driver else {}
            elif method == "spsa":
                r = zo_method(s, base, _spsa_overrides(s) + ["optim.name=sgd", f"optim.lr={lr}"],
                              os.path.join(out_dir, "sweep", f"spsa-{lr:g}"), s["spsa_queries"] + 1)
            else:
                r = zo_method(s, base, ["optim.name=lizo", f"optim.lr={lr}", f"optim.num_sample_per_step={s['lizo_n']}",
                                        "optim.reuse_distance_bound=-1"], os.path.join(out_dir, "sweep", f"lizo-{lr:g}"),
                              s["lizo_n"] + 1)
            if comm.is_driver:
                row = {"method": method, "lr": lr, "val_accuracy": r["val_accuracy"], "queries": r.get("queries")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv=None) -> None:
    """``python -m zohpc.reproduce.peft_finetune sweep [--budget N] [--out DIR]`` (under mpirun as the study)."""
    import argparse

    from ..comm import run_main

    p = argparse.ArgumentParser(prog="zohpc.reproduce.peft_finetune")
    p.add_argument("what", choices=["sweep"])
    p.add_argument("--budget", type=int, default=FULL["budget"], help="queries per ZO run (default: the study's)")
    p.add_argument("--methods", default="spsa,lizo,fo")
    p.add_argument("--out", default="runs/reproduce/peft_finetune")
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in methods if m not in SWEEP]
    if bad:
        p.error(f"--methods: unknown {bad[0]!r} (choose from {', '.join(SWEEP)})")

    def entry(comm):
        sweep(comm, args.out, args.budget, methods)
        return 0

    run_main(entry, "zohpc.reproduce.peft_finetune")


__all__ = ["PAPER", "run", "table", "plot", "settings", "pretrain", "sweep"]


if __name__ == "__main__":
    main()
