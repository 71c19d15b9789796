"""Sentence encoders: `fit(anchors, positives)` over `recipes/embed.py` (`train.embed`)."""

from __future__ import annotations

import numpy as np

from minilm_jax.api.common import SHORTHANDS, History, _config, _history, _pairs, _run_dir, _texts

EMBED_SHORTHANDS = {
    **{k: v for k, v in SHORTHANDS.items() if k != "buckets"}, "buckets": "data.buckets",
    "scale": "objective.scale", "symmetric": "objective.symmetric",
    "matryoshka_dims": "objective.matryoshka_dims", "grad_cache_chunk":
    "objective.grad_cache_chunk", "pooling": "objective.pooling",
    "mask_duplicates": "objective.mask_duplicates",
}


def _negatives(negatives, n: int) -> list[list[str]]:
  """Hard negatives: one text per anchor, or K texts per anchor (the same K for all)."""
  negatives = list(negatives)
  if len(negatives) != n:
    raise ValueError(f"fit: {n} anchors but {len(negatives)} negatives")
  rows = [[x] if isinstance(x, str) else list(x) for x in negatives]
  ks = {len(r) for r in rows}
  if len(ks) != 1 or 0 in ks:
    raise ValueError(f"fit: every anchor needs the same number (>= 1) of negatives, got {ks}")
  for i, r in enumerate(rows):
    _texts(r, f"fit negatives of anchor {i}")
  return rows


def fit_pairs(m, anchors, positives, *, negatives=None, eval_retrieval=None, eval_sts=None,
              **config) -> History:
  """Trains encoder `m` contrastively in place: each anchor against its positive and every
  other text of the global batch (MultipleNegativesRankingLoss, scale 20 on cosine; equal
  texts are masked, not negatives). `negatives`: hard negatives, one or K per anchor.
  Evaluated before training and every `eval_every` steps: `eval_retrieval=(queries, documents)`
  (MRR@10, nDCG@10, Recall@1/10, the i-th document relevant to the i-th query) and
  `eval_sts=(sentences1, sentences2, scores)` (Spearman of cosine). The job is
  `python -m train.embed`'s; keywords: `EMBED_SHORTHANDS` or section__key."""
  from minilm_jax.recipes import embed as recipe
  from minilm_jax.recipes.finetune import ModelSpec
  if m.task != "encoder":
    raise ValueError(f"fit(anchors, positives) trains an encoder; this one is a {m.task!r} "
                     f"model (load it with minilm_jax.from_pretrained(path))")
  anchors = _texts(anchors, "fit anchors")
  if positives is None:
    raise TypeError("fit(anchors, positives): an encoder trains on pairs; positives missing")
  positives = list(positives)
  distinct = len({p if isinstance(p, str) else repr(p) for p in positives})
  if not all(isinstance(p, str) for p in positives) or (len(positives) >= 4
                                                         and distinct <= len(positives) // 2):
    raise ValueError(
        f"fit on an encoder trains on (anchor, positive) text pairs; these positives look like "
        f"class labels ({distinct} distinct values over {len(positives)} rows), and with "
        f"in-batch negatives a repeated positive is no negative. To classify, load "
        f"minilm_jax.from_pretrained(path, 'classification', num_labels=N)")
  positives = _pairs(positives, len(anchors), "fit")
  columns = ["anchor", "positive"]
  rows = [{"anchor": a, "positive": p} for a, p in zip(anchors, positives)]
  if negatives is not None:
    neg = _negatives(negatives, len(anchors))
    columns += [f"negative_{k + 1}" for k in range(len(neg[0]))]
    rows = [{**r, **{c: t for c, t in zip(columns[2:], ns)}} for r, ns in zip(rows, neg)]
  examples = {"train": rows}
  if eval_retrieval is not None:
    if not isinstance(eval_retrieval, (tuple, list)) or len(eval_retrieval) != 2:
      raise TypeError("fit: eval_retrieval must be (queries, documents)")
    q = _texts(eval_retrieval[0], "fit eval_retrieval queries")
    d = _pairs(eval_retrieval[1], len(q), "fit eval_retrieval")
    examples["retrieval"] = [{"query": a, "document": b} for a, b in zip(q, d)]
  if eval_sts is not None:
    if not isinstance(eval_sts, (tuple, list)) or len(eval_sts) != 3:
      raise TypeError("fit: eval_sts must be (sentences1, sentences2, scores)")
    s1 = _texts(eval_sts[0], "fit eval_sts")
    s2 = _pairs(eval_sts[1], len(s1), "fit eval_sts")
    scores = list(eval_sts[2])
    for i, y in enumerate(scores):
      if isinstance(y, bool) or not isinstance(y, (int, float, np.integer, np.floating)):
        raise ValueError(f"fit eval_sts: score {i} ({y!r}) is not a number")
    if len(scores) != len(s1):
      raise ValueError(f"fit eval_sts: {len(s1)} sentence pairs but {len(scores)} scores")
    examples["sts"] = [{"sentence1": a, "sentence2": b, "score": float(y)}
                       for a, b, y in zip(s1, s2, scores)]
  cfg = recipe.EmbedConfig(
      model=ModelSpec(path=str(m.source), dtype=m.config.dtype),
      data=recipe.EmbedData(source="examples", columns=tuple(columns)),
      export_sentence_transformers=False)
  cfg = _config(cfg, EMBED_SHORTHANDS, config, "fit")
  given = "output_dir" in config
  with _run_dir(cfg, given, "export_sentence_transformers") as cfg:
    summary, trained = recipe.run_job(cfg, model=m, examples=examples)
  m.model, m.pooling = trained.model, trained.pooling
  return _history(m, summary, cfg, given)
