"""The built-in task ``hf``: a Hugging Face causal language model as a prompt-based classifier.

    python -m zohpc.train --set task.name=hf --set task.path=DIR --set lora.target='q_proj|v_proj' ...

The model and its tokenizer come from a local directory (``from_pretrained(path,
local_files_only=True)`` with ``HF_HUB_OFFLINE=1``: zohpc never downloads), or, with
``path = ""``, a small Llama is built from a config (``hidden``, ``layers``, ``heads``) over
the synthetic language's vocabulary (:mod:`zohpc.tasks.language`). The data are that
language's reviews, tokenized by the tokenizer; the classifier reads the language model's
next-word logits of the label words (``bad`` = 0, ``good`` = 1) after the prompt, as MeZO
fine-tunes with prompts, so the untrained-for-the-task model already is a zero-shot classifier.

A missing directory, one without a model, or a model that would need the network (a hub
name, remote code) is one line and exit 2. Needs the optional extra ``zohpc[hf]``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError, UserError
from .base import Task, task_options

OPTIONS = {"path": "", "hidden": 32, "layers": 2, "heads": 4, "train_size": 2048, "test_size": 1024}


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # never a download, whatever the path says
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers
    except ImportError:
        from ..lora import EXTRA_HINT

        raise ConfigError(f"task 'hf': needs the transformers library: {EXTRA_HINT}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


class PromptClassifier(nn.Module):
    """Logits of the label words at the last position of a causal LM: ``(B, classes)``."""

    def __init__(self, lm: nn.Module, label_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("label_ids", torch.tensor(label_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids, use_cache=False).logits
        return logits[:, -1, :].index_select(-1, self.label_ids)


def build_lm(vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int = 64, seed: int = 0,
             init_std: float = 0.02):
    """A small Llama causal LM from a config (eager attention: deterministic, vmap-friendly).

    ``init_std``: the normal init's std (``initializer_range``; Hugging Face's default 0.02).
    A model this small pretrained from 0.02 can sit for many epochs on the context-free
    plateau (attention near uniform, next-word guesses from position alone); 0.2 leaves it."""
    tf = _transformers()
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                            max_position_embeddings=max_positions, attn_implementation="eager",
                            pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
                            initializer_range=init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.LlamaForCausalLM(config)


def load_pretrained(path: str):
    """``(model, tokenizer)`` from the local directory ``path``; one-line errors (see the module)."""
    tf = _transformers()
    if not os.path.isdir(path):
        raise ConfigError(f"config key 'task.path': {path!r} is not a directory (zohpc loads Hugging Face models "
                          f"from local directories only, never from the network)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"config key 'task.path': {path!r} holds no Hugging Face model (no config.json); "
                          f"save one there with save_pretrained (zohpc never downloads)")
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        if getattr(config, "auto_map", None):
            raise UserError(f"config key 'task.path': the model in {path!r} needs remote code (auto_map), "
                            f"which zohpc does not run")
        config._attn_implementation = "eager"
        model = tf.AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing files, a hub id, a network need: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"config key 'task.path': cannot load a causal LM and its tokenizer from {path!r} "
                        f"without the network ({type(exc).__name__}: {first[:200]})") from None
    model.eval()
    return model, tok


def label_ids(tok, words) -> list[int]:
    ids = []
    for w in words:
        got = tok(w, add_special_tokens=False)["input_ids"]
        if len(got) != 1 or got[0] == tok.unk_token_id:
            raise UserError(f"task 'hf': the tokenizer has no single token for the label word {w!r}")
        ids.append(got[0])
    return ids


def make_task(lm, tok, train_size: int, test_size: int, seed: int, name: str = "hf", test_split: str = "test") -> Task:
    """The review classification task of :mod:`zohpc.tasks.language` on ``lm`` (cross entropy, accuracy).

    ``test_split``: the split held out as ``task.test`` ("test", or "val" for tuning on it)."""
    from . import language

    model = PromptClassifier(lm, label_ids(tok, language.LABEL_WORDS))
    texts, y = language.reviews(train_size, seed, "train")
    ttexts, ty = language.reviews(test_size, seed, test_split)
    return Task(model=model, train=(language.encode(tok, texts), y), test=(language.encode(tok, ttexts), ty),
                loss=None, metrics=accuracy, name=name,
                info={"vocab": len(tok), "seq_len": len(texts[0].split())})


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    return {"accuracy": float((outputs.argmax(1) == targets).double().mean())}


def build(cfg) -> Task:
    """The factory of ``task.name = "hf"`` (options in ``[task]``: see ``OPTIONS``)."""
    o = task_options(cfg, OPTIONS, "hf")
    seed = cfg.train.seed
    if o["path"]:
        lm, tok = load_pretrained(os.path.expandvars(os.path.expanduser(o["path"])))
    else:
        from . import language

        tok = language.tokenizer()
        lm = build_lm(len(tok), o["hidden"], o["layers"], o["heads"], seed=seed)
    return make_task(lm, tok, o["train_size"], o["test_size"], seed)
