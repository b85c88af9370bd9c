"""A documented synthetic language: reviews with a hidden sentiment, for pretraining a small
language model and fine-tuning it on a classification task of the same language.

Words: ``the``, ``was``, ``.``, ``verdict``, ``:``, 8 nouns, 6 positive adjectives (``good``
first) and 6 negative ones (``bad`` first), plus ``[PAD]`` and ``[UNK]``.

* A **clause** is ``the NOUN was ADJ .`` (5 words; noun uniform).
* A **document** (pretraining text) has a hidden sentiment s (positive or negative, even odds)
  and ``clauses`` clauses; each clause's adjective has sentiment s with probability
  ``agreement`` (0.8), else the other one, uniform within its sentiment. A language model
  trained on documents learns to predict the next adjective's sentiment from the earlier
  ones: a majority vote.
* A **review** (the downstream task) is 3 clauses whose adjective sentiments are drawn
  independently, then ``verdict :``; its label is the majority sentiment (1 = positive).
  ``verdict`` and ``:`` never occur in pretraining, so a prompt-based zero-shot classifier
  (``good`` vs ``bad`` as the next word) starts near chance and fine-tuning must teach the
  model what the verdict asks for.

Everything is a pure function of the seed (:func:`zohpc.seeding.generator`).
"""

from __future__ import annotations

import torch

from ..seeding import generator

SPECIALS = ["[PAD]", "[UNK]"]
FUNCTION_WORDS = ["the", "was", ".", "verdict", ":"]
NOUNS = ["film", "plot", "cast", "music", "ending", "script", "scene", "pace"]
POSITIVE = ["good", "great", "superb", "lovely", "clever", "moving"]
NEGATIVE = ["bad", "dull", "awful", "weak", "boring", "clumsy"]
VOCAB = SPECIALS + FUNCTION_WORDS + NOUNS + POSITIVE + NEGATIVE
LABEL_WORDS = ("bad", "good")  # label 0, label 1 (the verbalizer)
PROMPT = ["verdict", ":"]
CLAUSE_WORDS = 5
REVIEW_CLAUSES = 3


def _clauses(g, sentiments: torch.Tensor) -> list[list[str]]:
    """Word lists for a (n, k) 0/1 sentiment table: clause j of row i has sentiment [i, j]."""
    n, k = sentiments.shape
    nouns = torch.randint(0, len(NOUNS), (n, k), generator=g)
    adjs = torch.randint(0, len(POSITIVE), (n, k), generator=g)
    rows = []
    for i in range(n):
        words = []
        for j in range(k):
            adj = (POSITIVE if sentiments[i, j] else NEGATIVE)[int(adjs[i, j])]
            words += ["the", NOUNS[int(nouns[i, j])], "was", adj, "."]
        rows.append(words)
    return rows


def documents(n: int, seed: int, clauses: int = 4, agreement: float = 0.8) -> list[str]:
    """``n`` pretraining documents (strings of words separated by spaces)."""
    g = generator("language-documents", seed)
    hidden = torch.randint(0, 2, (n, 1), generator=g)
    agree = torch.rand(n, clauses, generator=g) < agreement
    sentiments = torch.where(agree, hidden, 1 - hidden)
    return [" ".join(w) for w in _clauses(g, sentiments)]


def reviews(n: int, seed: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """``n`` reviews ending in the prompt ``verdict :`` and their labels (majority sentiment)."""
    g = generator(f"language-reviews-{split}", seed)
    sentiments = torch.randint(0, 2, (n, REVIEW_CLAUSES), generator=g)
    labels = (sentiments.sum(1) * 2 > REVIEW_CLAUSES).long()
    return [" ".join(w + PROMPT) for w in _clauses(g, sentiments)], labels


def tokenizer():
    """A word-level ``transformers`` tokenizer of :data:`VOCAB` (built locally, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def encode(tok, texts: list[str]) -> torch.Tensor:
    """Token ids ``(n, length)`` (int64) of texts that all have the same number of words."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    lengths = {len(r) for r in ids}
    if len(lengths) != 1:
        raise ValueError(f"texts of different lengths {sorted(lengths)}: pad them first")
    return torch.tensor(ids, dtype=torch.long)
