"""Sentence-embedding training: the contrastive `Objective` (in-batch negatives, hard negatives,
Matryoshka) over batches of (anchor, positive, negatives...) texts.

A batch holds, for each role r in anchor / positive / negative (the last optional):
  r_input_ids, r_attention_mask, r_token_type_ids   (B, T) int32; negatives (B, K, T)
  r_text_id                                          (B,) int32 text hash (negatives (B, K))
  weights                                            (B,) 0 for padding rows
The candidates of anchor i are every positive and negative of the batch. Under the loop's jit the
batch is sharded over the mesh's data axes and the similarity matrix is computed over the global
arrays, so XLA all-gathers the candidates: every anchor of a global batch of 1024 on 8 devices
(or on 4 hosts) scores 1023 in-batch negatives, and the gradient flows back through the gather.

False negatives: a candidate whose text id equals anchor i's positive's (the same text twice in
one batch) is masked out of anchor i's softmax instead of counted as a negative. Text ids are
32-bit hashes, so a hash collision masks one true negative (a 2^-32 event per pair).
"""

from __future__ import annotations

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import losses, metrics
from minilm_jax.model import encoder_of
from minilm_jax.pooling import Pooling
from minilm_jax.trainer import Objective


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  scale: float = 20.0                        # 1 / temperature (sentence-transformers' default)
  symmetric: bool = False                    # + each positive's loss over the anchors
  matryoshka_dims: tuple[int, ...] = ()      # e.g. (384, 256, 128, 64); () = full width only
  matryoshka_weights: tuple[float, ...] = ()  # default 1 each
  mask_duplicates: bool = True               # mask same-text candidates (false negatives)


def _blocks(x: jax.Array) -> jax.Array:
  """(B, K, ...) -> (K*B, ...): all first negatives, then all second ones, ..."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def role_arrays(batch: dict, role: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ids, mask, types) of one role, (N, T); negatives (B, K, T) flattened block by block (all
  first negatives, then all second ones, ...), the order of the candidates."""
  arrays = tuple(batch[f"{role}_{k}"] for k in ("input_ids", "attention_mask", "token_type_ids"))
  if arrays[0].ndim == 3:
    arrays = tuple(_blocks(x) for x in arrays)
  return arrays


def embed(model, arrays, pooling: Pooling, rng=None) -> jax.Array:
  """(N, D) pooled embeddings of (ids, mask, types)."""
  ids, mask, types = arrays
  hidden, _ = encoder_of(model)(ids, mask, types, dropout_rng=rng)
  return pooling(hidden, mask)


def _roles(batch: dict) -> list[str]:
  return ["anchor", "positive"] + (["negative"] if "negative_input_ids" in batch else [])


def _role_rng(rng, i: int):
  return None if rng is None else jax.random.fold_in(rng, i)  # dropout per role


def candidate_ids(batch: dict) -> jnp.ndarray:
  ids = [batch["positive_text_id"]]
  if "negative_text_id" in batch:
    ids.append(_blocks(batch["negative_text_id"]))
  return jnp.concatenate(ids)


def loss_from_embeddings(anchors, candidates, batch: dict, cfg: ContrastiveConfig):
  """(B,) per-anchor loss of embeddings already computed (GradCache differentiates this)."""
  same = None
  if cfg.mask_duplicates and "positive_text_id" in batch:
    same = batch["positive_text_id"][:, None] == candidate_ids(batch)[None, :]
  kw = dict(scale=cfg.scale, symmetric=cfg.symmetric, valid=batch["weights"] > 0, same=same)
  if cfg.matryoshka_dims:
    return losses.matryoshka(losses.in_batch_negatives, anchors, candidates,
                             cfg.matryoshka_dims, cfg.matryoshka_weights or None, **kw)
  return losses.in_batch_negatives(anchors, candidates, **kw)


def _weighted(per, aux, batch):
  w = batch["weights"].astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(w.sum(), 1.0), aux


def _accuracy(a, c, batch):
  w = batch["weights"]
  hit = (jnp.argmax(a @ c.T, axis=1) == jnp.arange(a.shape[0])).astype(jnp.float32)
  return {"accuracy": jnp.sum(hit * w) / jnp.maximum(w.sum(), 1.0)}


def objective(pooling: Pooling, cfg: ContrastiveConfig = ContrastiveConfig(), *,
              grad_cache_chunk: int = 0, eval_sets=()) -> Objective:
  """The contrastive objective: per-anchor loss, in-batch top-1 accuracy as aux.

  eval_sets: the `data.EvalSets` evaluated (or their `.kinds`, without corpus sets): "sts"
  gives `<name>/spearman` (of cosine against the gold scores); "retrieval" (each anchor a
  query over the set's distinct positives) and "corpus" (queries over a document corpus,
  relevance from qrels) `<name>/mrr@10`, `/ndcg@10`, `/recall@1`, `/recall@10`. The best
  checkpoint goes by the first set's spearman or ndcg@10 unless the loop's best_metric says
  otherwise.

  grad_cache_chunk > 0: GradCache (Gao et al. 2021): embed every role in chunks of that many
  texts without gradients, take the loss's gradients with respect to the embeddings, then run
  each chunk again with gradients and back-propagate its slice. Activation memory is one
  chunk's whatever the batch; the gradients are the direct step's."""

  def loss_fn(model, batch, rng, frozen=None):
    a, *cs = (embed(model, role_arrays(batch, r), pooling, _role_rng(rng, i))
              for i, r in enumerate(_roles(batch)))
    c = jnp.concatenate(cs)
    return loss_from_embeddings(a, c, batch, cfg), _accuracy(a, c, batch)

  kinds = eval_sets.kinds if hasattr(eval_sets, "kinds") else list(eval_sets)

  def eval_fn(model, batch, frozen=None):
    # A corpus's query and document batches carry one role each: the other is zeros, so every
    # output has a row per batch row.
    b = batch["weights"].shape[0]
    a, p = (embed(model, role_arrays(batch, r), pooling) if f"{r}_input_ids" in batch else None
            for r in ("anchor", "positive"))
    a = jnp.zeros_like(p) if a is None else a
    p = jnp.zeros_like(a) if p is None else p
    cos = jnp.sum(losses.l2_normalize(a) * losses.l2_normalize(p), axis=-1)
    return {"anchor": a, "positive": p, "cosine": cos, "eval_set": batch["eval_set"],
            "eval_part": batch["eval_part"],
            "positive_text_id": batch.get("positive_text_id", jnp.zeros(b, jnp.int32))}

  def metrics_fn(out):
    res = {}
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for i, (name, kind) in enumerate(kinds):
      rows = out["eval_set"] == i
      if kind == "sts":
        res[f"{name}/spearman"] = metrics.spearman(out["cosine"][rows], out["_labels"][rows])
        continue
      if kind == "corpus":  # in record order: queries (part 0), documents (part 1)
        def part(k, key):
          sel = rows & (out["eval_part"] == k)
          return out[key][sel][np.argsort(out["_index"][sel], kind="stable")]
        q, d, relevant = part(0, "anchor"), part(1, "positive"), eval_sets.relevant(i)
      else:
        _, first, which = np.unique(out["positive_text_id"][rows], return_index=True,
                                    return_inverse=True)
        q, d = out["anchor"][rows], out["positive"][rows][first]
        relevant = [[j] for j in which.reshape(-1)]
      ranked = metrics.retrieval_metrics(unit(q) @ unit(d).T, relevant)
      res.update({f"{name}/{k}": v for k, v in ranked.items()})
    return res

  best = None
  if kinds:
    name, kind = kinds[0]
    best = f"{name}/spearman" if kind == "sts" else f"{name}/ndcg@10"
  evaluation = dict(eval_fn=eval_fn, metrics_fn=metrics_fn, best_metric=best) if kinds else {}

  if not grad_cache_chunk:
    return Objective(loss_fn, **evaluation)

  def loss_and_grads(graphdef, params, batch, rng, frozen=None):
    def chunks(arrays):
      n = arrays[0].shape[0]
      if n % grad_cache_chunk:
        raise ValueError(f"grad_cache_chunk {grad_cache_chunk} must divide each role's "
                         f"{n} texts")
      return tuple(x.reshape(n // grad_cache_chunk, grad_cache_chunk, -1) for x in arrays)

    def embed_chunk(params, arrays, r, k):
      return embed(nnx.merge(graphdef, params), arrays, pooling, _role_rng(r, k))

    roles = [(chunks(role_arrays(batch, r)), _role_rng(rng, i))
             for i, r in enumerate(_roles(batch))]
    frozen_params = jax.lax.stop_gradient(params)
    embs = [jax.lax.map(lambda xs: embed_chunk(frozen_params, xs[:3], r, xs[3]),
                        (*parts, jnp.arange(parts[0].shape[0])))
            for parts, r in roles]                                  # (n, chunk, D) each

    def emb_loss(embs):
      flat = [e.reshape(-1, e.shape[-1]) for e in embs]
      a, c = flat[0], jnp.concatenate(flat[1:])
      return _weighted(loss_from_embeddings(a, c, batch, cfg), _accuracy(a, c, batch), batch)

    (loss, aux), d_embs = jax.value_and_grad(emb_loss, has_aux=True)(embs)
    grads = jax.tree.map(jnp.zeros_like, params)
    for (parts, r), d in zip(roles, d_embs, strict=True):
      def add(g, xs, r=r):
        *arrays, k, d_chunk = xs
        chunk_grads = jax.grad(lambda p: jnp.sum(embed_chunk(p, arrays, r, k) * d_chunk))(params)
        return jax.tree.map(jnp.add, g, chunk_grads), None
      grads, _ = jax.lax.scan(add, grads, (*parts, jnp.arange(parts[0].shape[0]), d))
    return loss, aux, grads

  return Objective(loss_fn, loss_and_grads=loss_and_grads, **evaluation)
