"""LoRA adapters: parameter-efficient fine-tuning by any estimator (the ``[lora]`` config section).

The adapters come from the ``peft`` library (``inject_adapter_in_model``): it wraps each
selected ``nn.Linear`` in place, so ``W x`` becomes ``W x + (alpha / r) B A x`` with
``A`` (r x in) and ``B`` (out x r, zero at the start: the adapted model begins as the base
model), and it freezes every other parameter (``requires_grad=False``). zohpc's coordinates,
masks, optimizers and estimators act on trainable parameters only, so the base weights are
never perturbed nor updated. Parameter names stay the model's own, with peft's pieces:
``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``, ``<layer>.lora_B.default.weight``.

Why peft: it is the well-kept implementation of LoRA for any module tree (Hugging Face
models and plain ones), with an exact merge; the adapter modules are ordinary parameters, so
the engine, ``torch.func.functional_call`` and ``vmap`` need nothing special. Dropout of the
adapters is always 0 (zeroth-order training needs a deterministic forward).

Checkpoints hold the trainable parameters (the adapters, and any ``lora.trainable`` extras)
and a fingerprint of the frozen ones (:func:`frozen_fingerprint`); a resume re-makes the base
from the task and refuses a base that differs. :func:`merge_adapters` gives the plain model
with ``W + (alpha / r) B A`` in place of each adapted layer (``python -m zohpc.export``).
"""

from __future__ import annotations

import copy
import hashlib
import re

import torch
from torch import nn

from .errors import ConfigError

EXTRA_HINT = "pip install 'zohpc[hf]' (the optional extra: transformers, peft)"
ADAPTER = "default"  # peft's adapter name: part of every adapter parameter's name


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(f"config key 'lora.target': LoRA adapters need the peft library: {EXTRA_HINT}") from None
    return peft


def _regex(key: str, pattern: str):
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"config key '{key}': {pattern!r} is not a regular expression ({exc})") from None


def linear_names(model: nn.Module, pattern: str) -> list[str]:
    """Names of the ``nn.Linear`` modules whose name the regular expression ``pattern`` matches
    (``re.search``), in ``named_modules`` order; ConfigError if there is none."""
    rx = _regex("lora.target", pattern)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    names = [n for n in linears if rx.search(n)]
    if not names:
        shown = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "")
        raise ConfigError(f"config key 'lora.target': {pattern!r} selects no nn.Linear layer of the model "
                          f"(its Linear layers: {shown or 'none'})")
    return names


def adapted_names(model: nn.Module) -> list[str]:
    """Names of the modules that hold LoRA adapters (empty for a plain model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def apply_lora(model: nn.Module, lcfg, seed: int) -> list[str]:
    """Put adapters of rank ``lcfg.rank`` on the Linear layers ``lcfg.target`` selects, in
    place; freeze everything else but the parameters ``lcfg.trainable`` names. Returns the
    adapted module names. The adapters' random ``A`` comes from a generator seeded by ``seed``
    (every rank, and every resumed run, builds the same). A model that already holds the same
    adapters is left as it is (a second ``zohpc.run`` on the same task)."""
    have = adapted_names(model)
    if have:
        if any(not _regex("lora.target", lcfg.target).search(n) for n in have):
            raise ConfigError(f"config key 'lora.target': the model already holds other adapters ({', '.join(have)})")
        return have
    names = linear_names(model, lcfg.target)
    peft = _peft()
    config = peft.LoraConfig(r=int(lcfg.rank), lora_alpha=float(lcfg.alpha), lora_dropout=0.0,
                             target_modules=names, bias="none")
    from .seeding import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("lora-init", seed))
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for p in model.parameters():  # only the adapters train (peft already froze the rest; be explicit)
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)
    if lcfg.trainable:
        rx = _regex("lora.trainable", lcfg.trainable)
        extra = [n for n, p in model.named_parameters() if rx.search(n)]
        if not extra:
            raise ConfigError(f"config key 'lora.trainable': {lcfg.trainable!r} names no parameter of the model")
        for n, p in model.named_parameters():
            if n in extra:
                p.requires_grad_(True)
    return names


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the frozen parameters, in order;
    "" when every parameter is trained (nothing to re-make on resume)."""
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return ""
    h = hashlib.sha256()
    for n, p in frozen:
        t = p.detach().to("cpu").contiguous()
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every adapted Linear is a plain Linear with weight
    ``W + (alpha / r) B A`` (peft's own merge); the model itself is not changed."""
    merged = copy.deepcopy(model)
    names = adapted_names(merged)
    for name in names:
        layer = merged.get_submodule(name)
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def lora_delta(model: nn.Module, name: str) -> torch.Tensor:
    """``(alpha / r) B A`` of the adapted layer ``name`` (float64; the reference the merge is tested against)."""
    layer = model.get_submodule(name)
    a = layer.lora_A[ADAPTER].weight.double()
    b = layer.lora_B[ADAPTER].weight.double()
    return (b @ a) * float(layer.scaling[ADAPTER])
