"""LoRA adapters on a tiny Hugging Face model built from a config, saved to a temporary
directory and loaded from there: only adapters train (frozen weights bit-identical), resume
is bit-identical, the merged export equals base plus adapters, and a missing or
network-needing directory is one line and exit 2. CI installs the ``hf`` extra."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from mpi_util import ROOT, env, run_ranks  # noqa: E402

from zohpc.config import load_config  # noqa: E402
from zohpc.lora import apply_lora, frozen_fingerprint, lora_delta, merge_adapters  # noqa: E402
from zohpc.tasks import hf, language  # noqa: E402
from zohpc.zo import Coordinates  # noqa: E402

LORA = ["lora.target=q_proj|v_proj", "lora.rank=2"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer, built from a config and saved (no download anywhere)."""
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    tok = language.tokenizer()
    lm = hf.build_lm(len(tok), 16, 1, 2, seed=0)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _adapted(base_dir):
    lm, tok = hf.load_pretrained(base_dir)
    task = hf.make_task(lm, tok, 32, 16, 0)
    apply_lora(task.model, load_config(None, LORA).lora, 0)
    return task


def test_only_adapters_are_coordinates_and_merge_is_exact(base_dir):
    task = _adapted(base_dir)
    model = task.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    coords = Coordinates(model)
    assert coords.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    coords.fill_grad(model, torch.ones(coords.total))
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())
    with torch.no_grad():  # non-zero B so the merge is not trivially the base
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    merged = merge_adapters(model)
    before = dict(model.named_parameters())
    after = dict(merged.named_parameters())
    name = "lm.model.layers.0.self_attn.q_proj"
    expected = before[f"{name}.base_layer.weight"].double() + lora_delta(model, name)
    assert torch.allclose(after[f"{name}.weight"].double(), expected, rtol=0, atol=1e-6)
    assert not any("lora" in n for n in after)
    x = task.train[0][:4]
    assert torch.allclose(model(x), merged(x), atol=1e-5)


def _train(out, extra, k=2, resume=False):
    args = ["-m", "zohpc.train", "--set", "task.name=hf", "--set", f"task.path={out['base']}",
            "--set", "task.train_size=64", "--set", "task.test_size=32", "--set", "data.batch_size=32",
            "--set", "prune.method=none", "--set", "train.epochs=2", "--set", "optim.lr=0.05",
            "--out", out["dir"]] + sum((["--set", o] for o in LORA + extra), [])
    if resume:
        args += ["--resume", "auto"]
    proc = run_ranks(k, args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _final(run_dir):
    from zohpc.checkpoint import load_checkpoint

    path = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.h5")))[-1]
    return path, load_checkpoint(path)


@pytest.mark.parametrize("estimator", [["optim.name=lizo", "optim.num_sample_per_step=4"],
                                       ["zo.estimator=spsa"]], ids=["lizo", "spsa"])
def test_lora_trains_under_two_ranks_resume_and_export(base_dir, tmp_path, estimator):
    whole = {"base": base_dir, "dir": str(tmp_path / "whole")}
    _train(whole, estimator)
    path, ck = _final(whole["dir"])
    assert ck.step == 4 and all(".lora_" in n for n in ck.params)  # adapters only in the checkpoint
    ref = _adapted(base_dir).model
    assert ck.extra["frozen_sha256"] == frozen_fingerprint(ref)  # the frozen base is bit-identical
    moved = [n for n, p in ref.named_parameters() if p.requires_grad and not torch.equal(p.detach(), ck.params[n])]
    assert moved  # the adapters trained

    parts = {"base": base_dir, "dir": str(tmp_path / "parts")}
    _train(parts, estimator + ["train.max_steps=2"])
    _train(parts, estimator, resume=True)
    _, ck2 = _final(parts["dir"])
    assert ck2.step == 4
    assert all(torch.equal(ck.params[n], ck2.params[n]) for n in ck.params)  # resume is bit-identical

    out = tmp_path / "merged.h5"
    proc = subprocess.run([sys.executable, "-m", "zohpc.export", path, str(out)], capture_output=True, text=True,
                          timeout=200, cwd=ROOT, env=env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    import h5py

    with torch.no_grad():
        named = dict(ref.named_parameters())
        for n, v in ck.params.items():
            named[n].copy_(v)
    name = "lm.model.layers.0.self_attn.v_proj"
    with h5py.File(out, "r") as fh:
        w = torch.from_numpy(fh["weights"][f"{name}.weight"][()])
        assert f"{name}.base_layer.weight" not in fh["weights"]
    expected = named[f"{name}.base_layer.weight"].double() + lora_delta(ref, name)
    assert torch.allclose(w.double(), expected, rtol=0, atol=1e-6)

    # nothing the user has is overwritten: an existing OUT needs --force, the checkpoint never
    before, ck_bytes = out.read_bytes(), open(path, "rb").read()
    for args, words in (([path, str(out)], "exists (pass --force to replace it)"),
                        ([path, path, "--force"], "is the input")):
        proc = subprocess.run([sys.executable, "-m", "zohpc.export", *args], capture_output=True, text=True,
                              timeout=200, cwd=ROOT, env=env())
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-2000:]
    assert out.read_bytes() == before and open(path, "rb").read() == ck_bytes


def test_missing_or_network_directory_is_one_line_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, says in ((str(tmp_path / "nowhere"), "not a directory"), ("gpt2", "never from the network"),
                       (str(empty), "no config.json")):
        with pytest.raises(Exception) as exc:
            hf.load_pretrained(path)
        assert says in str(exc.value) and type(exc.value).__name__ == "ConfigError"
    proc = subprocess.run([sys.executable, "-m", "zohpc.train", "--set", "task.name=hf", "--set", "task.path=gpt2",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=200, cwd=ROOT,
                          env=env())
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "gpt2" in lines[-1] and not any("Traceback" in ln for ln in lines)


def test_quick_study_under_two_ranks(tmp_path):
    """``peft_finetune --quick``: the JSON shape of the issue (target: within 60 s on an idle machine)."""
    proc = run_ranks(2, ["-m", "zohpc.reproduce", "peft_finetune", "--quick", "--json", "--out", str(tmp_path)],
                     timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    m = result["methods"]
    assert set(m) == {"fo", "spsa", "lizo", "lizo_no_reuse", "zero_shot"}
    budget = result["settings"]["budget"]
    for k in ("spsa", "lizo", "lizo_no_reuse"):
        assert 0 < m[k]["queries"] <= budget and 0 <= m[k]["accuracy"] <= 1 and 0 <= m[k]["val_accuracy"] <= 1
    assert m["lizo"]["reuse_rate"] > 0 and m["lizo_no_reuse"]["reuse_rate"] == 0  # the reuse run reuses
    assert set(result["goals"]) == {"zo_above_floor", "lizo_at_least_spsa"}
