"""The notebook API on the real sentence-transformers/all-MiniLM-L6-v2, and orbax model dirs.

Parity is against transformers' BertModel on the same files, with ONE padded batch of every
sentence and pair below. Errors are relative to the compared tensor's magnitude (conftest.rel_err:
max |got - want| / max |want|); absolute bounds failed on AMD where they passed on Intel.
  * real (mask=1) positions, RTOL = 1e-5. Largest relative errors measured, over hidden states,
    q/k/v, attention probabilities, pooler and `encode`: 2.2e-6 on a Sapphire Rapids Xeon (attention
    probabilities of layer 4), 3.7e-6 with torch's MKL and oneDNN held to AVX2 (MKL's code path on
    AMD CPUs: ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2), and the AMD EPYC report's
    k[2] 1.1e-5 absolute = 1.6e-6 relative (max |k[2]| 6.7). Margin 2.7x. A bug is far above it:
    a transposed k kernel gives 1.1, a missing k bias 5.6e-4, LayerNorm eps 1e-5 instead of
    1e-12 gives 5e-4 on the hidden states and 1e-6 still 5e-5 (test_parity_bound_catches_bugs).
  * padded positions are ill-conditioned: their error grows layer by layer (~3e-4 absolute by
    layer 4), worst in the padding of the empty sentence (2 real tokens, 68 pads). Torch float32
    itself is far from torch float64 there. So every position is compared with a float64
    reference (`model.double()`): we must be no worse than twice torch float32's own relative
    deviation (+ RTOL), and under PAD_RTOL = 1e-4, far below what a masking bug gives (O(1e-2)).
    Padded positions are never read downstream (pooling and losses mask them).
The "Hello world!" numbers are ground truth recorded from transformers' BertModel.
"""

from __future__ import annotations

import json
import shutil

import flax.nnx as nnx
import jax
import numpy as np
import pytest
from conftest import (
    assert_parity,
    check_error,
    random_batch,
    random_hf_model,
    rel_err,
    save_hf,
    torch_forward,
)

from minilm_jax import pretrained
from minilm_jax.model import Encoder

RTOL = 1e-5      # relative to the compared tensor's max |value|; see the module docstring
PAD_RTOL = 1e-4

SENTENCES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "",
    "Is this the real life? Is this just fantasy?!",
    "Prices rose 3.5% to $1,234.56 on 2024-01-15, up from 1,100.",
    "Café naïve résumé — Ångström, Éléonore, Zoë.",
    "東京は日本の首都です。",
    "我喜欢自然语言处理。",
    "안녕하세요, 세계!",
    "Emoji time 😀🎉👍🏽 and ❤️ hearts",
    "Mixed: C++ vs. C# vs. F#; e-mail me at someone@example.com",
    "URLs like https://example.org/path?q=1&x=2 are split too.",
    "ALL CAPS SHOUTING AND MiXeD CaSe",
    "Tabs\tand\nnewlines   and   multiple spaces",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "Γειά σου Κόσμε",
    "नमस्ते दुनिया",
    "(Parentheses), [brackets], {braces} <angles> \"quotes\" 'apostrophes'",
    "Numbers: 0 1 2 3 10 100 1000 3.14159 1e-5 ½ ² ٣",
    "The [MASK] sat on the mat.",
    "I can't believe it's not butter; you'd've thought so.",
    "Mr. Smith went to Washington D.C. at 5 p.m. on Tuesday.",
    "ß ø æ œ ð þ ł",
    "Zero-width\u200bspace and non\u00a0breaking space",
    "  leading and trailing spaces  ",
    "Repeated!!! punctuation??? ...and ellipses…",
    "word " + "a" * 120 + " over a hundred characters becomes one unknown token",
    ("MiniLM compresses large Transformer models by distilling the self-attention module of the "
     "last layer of the teacher, which makes the student flexible in depth; the value relation "
     "adds a deeper imitation of the teacher's behaviour. Results on SQuAD 2.0 and GLUE show it "
     "keeps over 99% accuracy with half the parameters."),
    "Sentence embeddings map text into a vector space where similar meanings lie close together.",
]
PAIRS = [
    ("How old are you?", "I am 25 years old."),
    ("What is the capital of France?", "Paris is the capital and most populous city of France."),
    ("A man is playing a guitar.", "Ein Mann spielt Gitarre."),
    ("", "The first text is empty."),
    ("短い文", "长的句子有很多字。"),
    ("Emoji 🚀", "🌍 earth & moon"),
    ("Is it 3:45 p.m.?", "No, it's 15:46."),
    ("Naïve question", "NAÏVE ANSWER"),
]


# --- the real checkpoint and its transformers reference, built once ---------------------------

@pytest.fixture(scope="module")
def gt(gt_model_dir):
  return pretrained.from_pretrained(gt_model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(gt_model_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(gt_model_dir)


@pytest.fixture(scope="module")
def hf_model(gt_model_dir):
  import transformers
  # Eager attention: the only implementation that returns attention probabilities.
  return transformers.BertModel.from_pretrained(gt_model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch(gt, hf_tokenizer):
  """Every sentence and pair in ONE padded batch; ours and transformers' ids must agree."""
  a, b = zip(*PAIRS)
  lengths = [len(x) for x in gt.tokenizer(SENTENCES, padding="do_not_pad")["input_ids"]]
  lengths += [len(x) for x in gt.tokenizer(list(a), list(b), padding="do_not_pad")["input_ids"]]
  length = max(lengths)
  ours = [gt.tokenizer(SENTENCES, padding="max_length", max_length=length),
          gt.tokenizer(list(a), list(b), padding="max_length", max_length=length)]
  theirs = [hf_tokenizer(SENTENCES, padding="max_length", max_length=length, return_tensors="np"),
            hf_tokenizer(list(a), list(b), padding="max_length", max_length=length,
                         return_tensors="np")]
  for o, t in zip(ours, theirs):
    for k in ("input_ids", "attention_mask", "token_type_ids"):
      assert o[k].dtype == np.int32
      np.testing.assert_array_equal(o[k], t[k], err_msg=k)
  return {k: np.concatenate([o[k] for o in ours]) for k in ours[0]}


@pytest.fixture(scope="module")
def reference(hf_model, batch):
  """transformers' outputs on `batch` in float32 (with all intermediates) and in float64."""
  import copy

  import torch
  out = torch_forward(hf_model, batch, output_hidden_states=True, output_attentions=True)
  hf64 = copy.deepcopy(hf_model).double()
  with torch.no_grad():
    out64 = hf64(**{k: torch.from_numpy(v).long() for k, v in batch.items()})
  return {"hidden": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy(),
          "hidden_states": [h.numpy() for h in out.hidden_states],
          "attentions": [a.numpy() for a in out.attentions],
          "hidden64": out64.last_hidden_state.numpy()}


@pytest.fixture(scope="module")
def ours(gt, batch):
  graphdef, state = nnx.split(gt.encoder)

  @jax.jit
  def run(state, batch):
    hidden, out = nnx.merge(graphdef, state)(**batch)
    return hidden, out

  hidden, out = run(state, batch)
  return jax.tree.map(np.asarray, (hidden, out))


def _max_abs(a, b, where=None) -> float:
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return float((d if where is None else d[where]).max())


def test_ground_truth_hello_world(gt):
  enc = gt.tokenizer(["Hello world!"])
  assert enc["input_ids"].tolist() == [[101, 7592, 2088, 999, 102]]
  hidden = np.asarray(gt(**enc))
  # Recorded to 6 decimals (rounding <= 5e-7), plus the kernels' error at this tensor's scale.
  bound = 5e-7 + RTOL * np.abs(hidden).max()
  np.testing.assert_allclose(hidden[0, 0, :5], [0.161123, 0.038277, 0.033650, 0.296472, -0.186750],
                             atol=bound, rtol=0)


def test_real_checkpoint_parity(gt, batch, reference):
  assert batch["input_ids"].shape[0] == len(SENTENCES) + len(PAIRS) >= 32
  real = batch["attention_mask"].astype(bool)[..., None]
  assert not real.all()  # the batch is padded
  hidden, pooled = gt(**batch, return_pooled=True)
  err_64 = rel_err(hidden, reference["hidden64"])
  torch_err_64 = rel_err(reference["hidden"], reference["hidden64"])
  print(f"all positions vs fp64: ours {err_64:.2e}, torch fp32 {torch_err_64:.2e}")
  assert_parity(hidden, reference["hidden"], RTOL, real, "hidden vs torch fp32")
  assert_parity(hidden, reference["hidden64"], RTOL, real, "hidden vs torch fp64")
  assert_parity(hidden, reference["hidden64"], min(PAD_RTOL, 2 * torch_err_64 + RTOL),
                what="hidden incl. padding vs torch fp64")
  assert_parity(pooled, reference["pooled"], RTOL, what="pooled")


def test_encode_matches_mean_pooling(gt, reference):
  """`encode` (length-sorted, padded to multiples of 16) = sentence-transformers' recipe."""
  n = len(SENTENCES)
  ref = reference["hidden"][:n]
  mask = gt.tokenizer(SENTENCES, padding="max_length",
                      max_length=ref.shape[1])["attention_mask"][..., None].astype(np.float64)
  mean = (ref * mask).sum(1) / mask.sum(1)
  want = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  got = gt.encode(SENTENCES, batch_size=16)
  assert got.shape == (n, 384) and got.dtype == np.float32
  assert_parity(got, want, RTOL, what="encode")
  assert_parity(gt.encode(SENTENCES[1]), got[1:2], RTOL, what="encode one")


def _intermediates_errors(out, batch, reference, hf_model) -> dict[str, float]:
  """Relative error of every intermediate distillation reads, name -> error."""
  import torch
  real = batch["attention_mask"].astype(bool)
  b, t = real.shape
  errs = {}
  for i, (h, want) in enumerate(zip(out["hidden_states"], reference["hidden_states"])):
    errs[f"hidden_states[{i}]"] = rel_err(h, want, real[..., None])
  # Probabilities of real query positions (padded keys carry no mass on either side).
  for i, (logits, want) in enumerate(zip(out["attention_logits"], reference["attentions"])):
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    errs[f"attention[{i}]"] = rel_err(probs, want, real[:, None, :, None])
  for i, layer in enumerate(hf_model.encoder.layer):
    x = torch.from_numpy(reference["hidden_states"][i])
    for name, proj in (("q", layer.attention.self.query), ("k", layer.attention.self.key),
                       ("v", layer.attention.self.value)):
      with torch.no_grad():
        want = proj(x).numpy().reshape(b, t, 12, 32)
      assert out[name][i].shape == (b, t, 12, 32)
      errs[f"{name}[{i}]"] = rel_err(out[name][i], want, real[..., None, None])
  return errs


def test_intermediates_match_transformers(ours, batch, reference, hf_model):
  """What distillation reads: per-layer hidden states, attention probabilities, q/k/v."""
  _, out = ours
  assert len(out["hidden_states"]) == len(reference["hidden_states"]) == 7
  errs = _intermediates_errors(out, batch, reference, hf_model)
  assert len(errs) == 7 + 6 + 18
  for name, err in errs.items():
    check_error(err, RTOL, name)


@pytest.mark.parametrize("bug", ["transposed k kernel", "missing k bias", "LayerNorm eps 1e-6"])
def test_parity_bound_catches_bugs(bug, gt_model_dir, batch, reference, hf_model):
  """RTOL stays tight enough to fail on the bugs a conversion or a layer can have."""
  import jax.numpy as jnp
  if bug.startswith("LayerNorm"):  # the checkpoint's eps is 1e-12; HF's default 1e-5 is worse
    m = pretrained.from_pretrained(gt_model_dir, layer_norm_eps=1e-6)
  else:
    m = pretrained.from_pretrained(gt_model_dir)
    k = m.encoder.layers[2].attn.k
    if bug == "transposed k kernel":  # (D, N, H) = (384, 12, 32): square as (D, N * H)
      k.kernel[...] = k.kernel[...].reshape(384, 384).T.reshape(384, 12, 32)
    else:
      k.bias[...] = jnp.zeros_like(k.bias[...])
  _, out = jax.jit(lambda b: m.encoder(**b))(batch)
  errs = _intermediates_errors(jax.tree.map(np.asarray, out), batch, reference, hf_model)
  worst = max(errs.values())
  assert worst > 3 * RTOL, f"{bug}: worst relative error {worst:.2e} does not fail RTOL"


def test_bfloat16_compute(gt_model_dir, gt, batch):
  """bf16 mixed precision (bf16 matmul operands, float32 accumulation; params, LayerNorm and
  softmax statistics stay float32) against float32.

  Measured on this batch (40 rows, real positions): CLS hidden state max abs 2.7e-2, min cosine
  0.999975; L2-normalised mean embedding max abs 1.9e-3, min cosine 0.99995. Bounds: about 2x
  the measured error, and cosine > 0.9995.
  """
  m16 = pretrained.from_pretrained(gt_model_dir, dtype="bfloat16")
  real = batch["attention_mask"][..., None].astype(np.float32)
  embeddings = []
  for m in (gt, m16):
    h = np.asarray(m(**batch), np.float32)
    mean = (h * real).sum(1) / real.sum(1)
    embeddings.append((h[:, 0], mean / np.linalg.norm(mean, axis=-1, keepdims=True)))
  (cls32, mean32), (cls16, mean16) = embeddings

  def cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  print(f"bf16: CLS max abs {_max_abs(cls16, cls32):.3e}, min cos {cos(cls16, cls32).min():.6f}; "
        f"mean max abs {_max_abs(mean16, mean32):.3e}, min cos {cos(mean16, mean32).min():.6f}")
  assert _max_abs(cls16, cls32) < 0.05 and cos(cls16, cls32).min() > 0.9995
  assert _max_abs(mean16, mean32) < 5e-3 and cos(mean16, mean32).min() > 0.9995


def test_export_is_bit_identical(gt, gt_model_dir, tmp_path):
  from minilm_jax import hf
  gt.export_hf(tmp_path)
  exported, original = hf.read_hf_weights(tmp_path), hf.read_hf_weights(gt_model_dir)
  original = {k: v for k, v in original.items() if not k.endswith("position_ids")}
  assert exported.keys() == original.keys()
  assert all(np.array_equal(exported[k], original[k]) for k in original)
  assert (tmp_path / "vocab.txt").read_bytes() == (gt_model_dir / "vocab.txt").read_bytes()


def test_too_long_input(gt):
  with pytest.raises(ValueError, match="at most 512 tokens"):
    gt(np.full((1, 513), 1000, np.int32))


# --- orbax model directories -------------------------------------------------------------------

@pytest.fixture
def tiny_dir(tiny_cfg, tmp_path):
  """A tiny random HF checkpoint with a WordPiece vocabulary."""
  return save_hf(random_hf_model(tiny_cfg, seed=21), tmp_path / "hf", vocab=True)


@pytest.fixture
def concrete_inits(monkeypatch):
  """Records calls of jax.random.normal with a concrete key (abstract ones are eval_shape's)."""
  calls = []
  normal = jax.random.normal

  def spy(key, *args, **kw):
    if not isinstance(key, jax.core.Tracer):
      calls.append(args)
    return normal(key, *args, **kw)
  monkeypatch.setattr(jax.random, "normal", spy)
  return calls


def test_save_restore(tiny_dir, tiny_cfg, tmp_path, concrete_inits):
  """Save -> restore is exact, and neither HF loading nor orbax restoring draws random weights.

  The spy must also see a real `build`: if model init stopped going through jax.random.normal,
  this test fails instead of passing vacuously.
  """
  m = pretrained.from_pretrained(tiny_dir)
  assert not concrete_inits, "loading a complete HF checkpoint ran a random init"
  m.save(tmp_path / "ours")
  restored = pretrained.from_pretrained(tmp_path / "ours")
  assert not concrete_inits, "restoring an orbax model dir ran a random init"
  pretrained.build(tiny_cfg.replace(num_layers=0))  # the spy does see a real init (cheap one)
  assert concrete_inits

  assert restored.config == m.config and restored.task == "encoder"
  assert restored.tokenizer.vocab_size == m.tokenizer.vocab_size
  want, got = pretrained.flat_params(m.model), pretrained.flat_params(restored.model)
  assert want.keys() == got.keys()
  assert all(np.array_equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
  batch = m.tokenizer(["hello world!", "the cat sat on the mat."])
  np.testing.assert_array_equal(restored(**batch), m(**batch))


def test_save_restore_classifier(tiny_dir, tmp_path):
  m = pretrained.from_pretrained(tiny_dir, "classification", 3)
  m.save(tmp_path / "ours")
  restored = pretrained.from_pretrained(tmp_path / "ours")
  assert (restored.task, restored.num_labels) == ("classification", 3)
  batch = random_batch(m.config)
  np.testing.assert_array_equal(restored.model(**batch)[0], m.model(**batch)[0])


def _garble(path):
  path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size,
                                                           dtype=np.uint8)))


# A failed orbax read can leave its background event loop to be closed after the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["array data", "truncated metadata", "no params", "meta json"])
def test_corrupt_model_dir(damage, tiny_dir, tmp_path):
  saved = pretrained.from_pretrained(tiny_dir).save(tmp_path / "ours")
  params = saved / "params"
  if damage == "array data":  # every data file of the tensorstore (which ones hold what varies)
    files = [p for p in params.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
      _garble(p)
  elif damage == "truncated metadata":
    p = params / "_METADATA"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  elif damage == "no params":
    shutil.rmtree(params)
  else:
    (saved / "minilm_jax.json").write_text("{not json")
  error = FileNotFoundError if damage == "no params" else ValueError
  with pytest.raises(error, match=str(saved)):
    pretrained.from_pretrained(saved)


def test_missing_files(tiny_dir, tiny_cfg, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "weights.onnx").write_bytes(b"\0")
  with pytest.raises(FileNotFoundError, match="neither an HF checkpoint .* nor a minilm_jax"):
    pretrained.from_pretrained(tmp_path / "empty")
  (tiny_dir / "vocab.txt").unlink()
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    pretrained.from_pretrained(tiny_dir)


def test_unknown_config_key(tiny_dir, tmp_path):
  saved = pretrained.from_pretrained(tiny_dir).save(tmp_path / "ours")
  meta = json.loads((saved / "minilm_jax.json").read_text())
  meta["config"]["num_experts"] = 8
  (saved / "minilm_jax.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="num_experts"):
    pretrained.from_pretrained(saved)


def test_wrong_tokenizer_for_checkpoint(tiny_cfg, tmp_path):
  """A WordPiece vocab next to weights whose config says 250037 rows (XLM-R's table)."""
  cfg = tiny_cfg.replace(vocab_size=250037, tokenizer="xlmr")
  save_hf(random_hf_model(cfg, seed=22), tmp_path, vocab=True)
  config = json.loads((tmp_path / "config.json").read_text())
  del config["minilm_jax_tokenizer"]  # as a real HF checkpoint: the kind is guessed from the size
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="wordpiece.*xlmr"):
    pretrained.from_pretrained(tmp_path)


def test_encoder_is_the_model(gt):
  assert isinstance(gt.encoder, Encoder) and gt.encoder is gt.model
  assert gt.config.num_layers == 6 and gt.config.use_pooler


def test_calls_read_the_live_weights(tiny_dir):
  """`m(...)` used a snapshot of the params taken at construction: after training or
  `nnx.update(m.model, ...)` it silently ran the old weights. Now every call reads m.model."""
  m = pretrained.from_pretrained(tiny_dir)
  batch = m.tokenizer(["hello world!", "the cat sat on the mat."])
  before = np.asarray(m(**batch))
  params = nnx.state(m.model, nnx.Param)
  nnx.update(m.model, jax.tree.map(lambda x: x * 1.5, params))
  after = np.asarray(m(**batch))
  want = np.asarray(m.model(**batch)[0])
  assert not np.allclose(after, before, atol=1e-3)
  np.testing.assert_allclose(after, want, rtol=1e-6, atol=1e-6)
  m.model = pretrained.from_pretrained(tiny_dir).model  # a replaced model is read too
  np.testing.assert_allclose(np.asarray(m(**batch)), before, rtol=1e-6, atol=1e-6)


# --- packed rows -------------------------------------------------------------------------------

def pack_rows(batch: dict, width: int) -> tuple[dict, list[list[tuple[int, int, int]]]]:
  """Greedy first-fit packing of a padded batch's examples into rows of `width` tokens ->
  (packed batch with segment_ids, per row [(example, start, length)])."""
  lengths = batch["attention_mask"].sum(1)
  rows: list[list[tuple[int, int, int]]] = []
  for i, n in enumerate(lengths):
    for row in rows:
      used = sum(m for _, _, m in row)
      if used + n <= width:
        row.append((i, used, int(n)))
        break
    else:
      rows.append([(i, 0, int(n))])
  out = {k: np.zeros((len(rows), width), np.int32) for k in ("input_ids", "token_type_ids",
                                                             "segment_ids")}
  for r, row in enumerate(rows):
    for j, (i, start, n) in enumerate(row):
      out["input_ids"][r, start:start + n] = batch["input_ids"][i, :n]
      out["token_type_ids"][r, start:start + n] = batch["token_type_ids"][i, :n]
      out["segment_ids"][r, start:start + n] = j + 1
  out["weights"] = np.ones(len(rows), np.float32)
  return out, rows


def test_packed_rows_equal_unpacked_examples(gt, batch, ours):
  """The real checkpoint on packed rows (block-diagonal attention, positions restarting per
  segment): every segment's hidden states, at every layer, and its q/k/v are the unpacked
  example's, within RTOL (relative, as the parity tests). Largest measured: 1.1e-6 (v of
  layer 4, Sapphire Rapids)."""
  packed, rows = pack_rows(batch, 128)
  assert len(rows) < len(batch["input_ids"]) and max(len(r) for r in rows) >= 3
  graphdef, state = nnx.split(gt.encoder)
  _, out = jax.jit(lambda s, b: nnx.merge(graphdef, s)(
      b["input_ids"], token_type_ids=b["token_type_ids"], segment_ids=b["segment_ids"]))(
          state, packed)
  _, want = ours
  for name in ("hidden_states", "q", "k", "v"):
    for layer, (got_l, want_l) in enumerate(zip(out[name], want[name], strict=True)):
      got = np.concatenate([np.asarray(got_l)[r, s:s + n] for r, row in enumerate(rows)
                            for _, s, n in row])
      ref = np.concatenate([want_l[i, :n] for row in rows for i, _, n in row])
      assert_parity(got, ref, RTOL, what=f"packed {name}[{layer}]")


@pytest.mark.parametrize("kind", ["minilm_v1", "minilm_v2", "xtreme_hidden"])
def test_packed_distillation_losses_equal_unpacked(kind, gt, batch):
  """all-MiniLM-L6-v2 teaching a 3-layer student made of its layers 0, 2, 4: each objective's
  loss over packed rows (rows weighted by their segment counts, as the loop does) equals the
  mean over the unpacked examples within 1e-5 (relative)."""
  from minilm_jax import distillation
  teacher = gt.encoder
  student = distillation.init_from_teacher_layers(teacher, gt.config.replace(num_layers=3),
                                                  (0, 2, 4))
  obj = {"minilm_v1": lambda: distillation.minilm_v1(teacher),
         "minilm_v2": lambda: distillation.minilm_v2(teacher, num_relation_heads=48),
         "xtreme_hidden": lambda: distillation.xtreme_hidden(teacher)}[kind]()
  graphdef = nnx.split(student)[0]
  unpacked = {**batch, "weights": np.ones(len(batch["input_ids"]), np.float32)}
  packed, _ = pack_rows(batch, 128)

  @jax.jit
  def loss(params, frozen, b):
    per_ex, _ = obj.loss_fn(nnx.merge(graphdef, params), b, None, frozen)
    w = obj.weights(b)
    return (per_ex * w).sum() / w.sum()
  params = nnx.split(student)[1]
  want, got = loss(params, obj.frozen, unpacked), loss(params, obj.frozen, packed)
  print(f"{kind}: unpacked {float(want):.6e}, packed {float(got):.6e}")
  assert float(want) > 0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
