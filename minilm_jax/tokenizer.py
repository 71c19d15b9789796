"""Tokenizers for MiniLM checkpoints: BERT WordPiece, XLM-R sentencepiece, RoBERTa byte-level BPE.

This module owns text -> fixed-shape id arrays: choosing the tokenizer from the files a checkpoint
ships (`load`), the special-token layout of each family, truncation, padding, character offsets
(for SQuAD-style span features) and the check that a tokenizer fits a model's embedding
(`check_fits`). Results match transformers 5.x (`BertTokenizer`, `XLMRobertaTokenizer`,
`RobertaTokenizer`) token for token; tests/test_tokenizer.py checks that.

Normalisation and subword models run in the HF `tokenizers` Rust library, configured as
transformers configures it. Truncation, special tokens, offsets and padding are done here, so
the layout of every family is written down in one place (`_TEMPLATES`) instead of hidden in a
post-processor. Never imports torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

# A special token: its text, or an AddedToken carrying lstrip/rstrip from tokenizer_config.json.
Special = str | hf.AddedToken

TRUNCATION = ("longest_first", "only_first", "only_second", "do_not_truncate")
PADDING = ("longest", "max_length", "do_not_pad")

# The special-token template of each family: a special token name, or "A"/"B" for the text and
# the pair; the number is the token type id. XLM-R and RoBERTa have one segment embedding, so
# all their types are 0 and the pair is separated by a doubled </s>.
_TEMPLATES = {
    "wordpiece": ((("cls", 0), ("A", 0), ("sep", 0)),
                  (("cls", 0), ("A", 0), ("sep", 0), ("B", 1), ("sep", 1))),
    "xlmr": ((("cls", 0), ("A", 0), ("sep", 0)),
             (("cls", 0), ("A", 0), ("sep", 0), ("sep", 0), ("B", 0), ("sep", 0))),
}
_TEMPLATES["bpe"] = _TEMPLATES["xlmr"]


class Tokenizer:
  """One interface over the three families; subclasses only build the `tokenizers` backend."""

  kind: str
  vocab_size: int
  pad_id: int
  cls_id: int
  sep_id: int
  unk_id: int
  mask_id: int

  def __init__(self, kind: str, backend: hf.Tokenizer, specials: dict[str, Special]):
    self.kind = kind
    self._backend = backend
    # Specials are matched in raw text, as transformers does: "[CLS]" inside a sentence becomes
    # id 101 ("[cls]" does not: normalized=False). Missing ones are appended after the vocab.
    backend.add_special_tokens([
        tok if isinstance(tok, hf.AddedToken) else hf.AddedToken(tok, normalized=False,
                                                                 special=True)
        for tok in specials.values()])
    ids = {name: backend.token_to_id(_content(tok)) for name, tok in specials.items()}
    self.pad_id, self.cls_id, self.sep_id = ids["pad"], ids["cls"], ids["sep"]
    self.unk_id, self.mask_id = ids["unk"], ids["mask"]
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

  def __repr__(self):
    return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"

  @property
  def backend(self) -> hf.Tokenizer:
    """The `tokenizers` pipeline (vocabulary, normaliser, specials) behind this tokenizer."""
    return self._backend

  def tokenize(self, text: str) -> list[str]:
    return self._backend.encode(_check_str(text), add_special_tokens=False).tokens

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return self._backend.encode(_check_str(text), add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def num_special_tokens(self, pair: bool) -> int:
    return sum(part not in ("A", "B") for part, _ in _TEMPLATES[self.kind][bool(pair)])

  def build_inputs(self, ids_a: list[int], ids_b: list[int] | None = None
                   ) -> tuple[list[int], list[int]]:
    """Adds the special tokens: returns (ids, token type ids)."""
    row = self._assemble(list(ids_a), None if ids_b is None else list(ids_b))
    return row["input_ids"], row["token_type_ids"]

  def _assemble(self, ids_a, ids_b, offs_a=None, offs_b=None) -> dict[str, list]:
    special = {"cls": self.cls_id, "sep": self.sep_id}
    content = {"A": (ids_a, offs_a or [(0, 0)] * len(ids_a), 0)}
    if ids_b is not None:
      content["B"] = (ids_b, offs_b or [(0, 0)] * len(ids_b), 1)
    row = {"input_ids": [], "token_type_ids": [], "offsets": [], "sequence_ids": []}
    for part, type_id in _TEMPLATES[self.kind][ids_b is not None]:
      if part in content:
        ids, offs, seq = content[part]
        n = len(ids)
        row["input_ids"] += ids
        row["offsets"] += [tuple(o) for o in offs]
        row["sequence_ids"] += [seq] * n
      else:
        n = 1
        row["input_ids"].append(special[part])
        row["offsets"].append((0, 0))
        row["sequence_ids"].append(-1)
      row["token_type_ids"] += [type_id] * n
    return row

  def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None, *,
               max_length: int | None = None, truncation: str = "longest_first",
               padding: str = "longest", pad_to_multiple_of: int | None = None,
               return_offsets: bool = False, return_truncated: bool = False) -> dict[str, Any]:
    """Tokenizes a batch (a lone string is a batch of one) into int32 arrays of shape (B, T).

    Returns input_ids, attention_mask, token_type_ids and, with `return_offsets`, offsets
    (B, T, 2): character spans in the original text of each token's own segment, (0, 0) for
    special and pad tokens; sequence_ids (B, T): 0 text, 1 pair, -1 special or pad. With
    padding="do_not_pad" the values are per-example lists instead of arrays. With
    `return_truncated`, truncated (B,) bool: the example lost tokens to max_length.
    """
    texts = _as_batch(texts, "texts")
    if pairs is not None:
      pairs = _as_batch(pairs, "pairs")
      if len(pairs) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
    if truncation not in TRUNCATION:
      raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if padding not in PADDING:
      raise ValueError(f"padding must be one of {PADDING}, got {padding!r}")
    n_special = self.num_special_tokens(pairs is not None)
    if max_length is not None and max_length < n_special:
      raise ValueError(f"max_length {max_length} leaves no room for the {n_special} special tokens")
    if padding == "max_length" and max_length is None:
      raise ValueError("padding='max_length' needs max_length")
    if pad_to_multiple_of is not None and padding != "do_not_pad":
      if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
      if padding == "max_length" and max_length % pad_to_multiple_of:
        raise ValueError(f"max_length {max_length} is not a multiple of pad_to_multiple_of "
                         f"{pad_to_multiple_of}")

    enc_a = self._backend.encode_batch(texts, add_special_tokens=False)
    enc_b = (self._backend.encode_batch(pairs, add_special_tokens=False) if pairs is not None
             else [None] * len(texts))
    rows, truncated = [], []
    for a, b in zip(enc_a, enc_b):
      # Each getter copies out of Rust: fetch once, and offsets only when asked for.
      ids_a, ids_b = a.ids, None if b is None else b.ids
      n_a, n_b = len(ids_a), None if b is None else len(ids_b)
      if max_length is not None:
        if truncation == "do_not_truncate":
          total = n_a + (n_b or 0) + n_special
          if total > max_length:
            raise ValueError(f"sequence of {total} tokens exceeds max_length {max_length} "
                             "(truncation='do_not_truncate')")
        else:
          n_a, n_b = _truncated_lengths(n_a, n_b, max_length - n_special, truncation)
      truncated.append(n_a < len(ids_a) or (b is not None and n_b < len(ids_b)))
      offs_a = a.offsets[:n_a] if return_offsets else None
      offs_b = b.offsets[:n_b] if return_offsets and b is not None else None
      rows.append(self._assemble(ids_a[:n_a], None if b is None else ids_b[:n_b], offs_a, offs_b))

    keys = ["input_ids", "attention_mask", "token_type_ids"]
    if return_offsets:
      keys += ["offsets", "sequence_ids"]
    extra = {"truncated": np.asarray(truncated, bool)} if return_truncated else {}
    if padding == "do_not_pad":
      for row in rows:
        row["attention_mask"] = [1] * len(row["input_ids"])
      return {**{k: [row[k] for row in rows] for k in keys}, **extra}

    longest = max((len(row["input_ids"]) for row in rows), default=0)
    length = max_length if padding == "max_length" else longest
    if pad_to_multiple_of:
      length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    out = {
        "input_ids": np.full((batch, length), self.pad_id, np.int32),
        "attention_mask": np.zeros((batch, length), np.int32),
        "token_type_ids": np.zeros((batch, length), np.int32),
        "offsets": np.zeros((batch, length, 2), np.int32),
        "sequence_ids": np.full((batch, length), -1, np.int32),
    }
    for i, row in enumerate(rows):
      n = len(row["input_ids"])
      out["input_ids"][i, :n] = row["input_ids"]
      out["attention_mask"][i, :n] = 1
      out["token_type_ids"][i, :n] = row["token_type_ids"]
      out["sequence_ids"][i, :n] = row["sequence_ids"]
      if n:
        out["offsets"][i, :n] = row["offsets"]
    return {**{k: out[k] for k in keys}, **extra}


def _truncated_lengths(n_a: int, n_b: int | None, budget: int, strategy: str):
  """How many tokens of each sequence survive; the rules of `tokenizers` (what transformers runs).

  longest_first does not drop tokens one at a time as the slow Python tokenizers did: when both
  sequences are over half the budget they get budget // 2 each and the longer one gets the odd
  token (ties: the pair). Dropping one at a time from the longer would give the odd token to the
  first text on ties.
  """
  if n_b is None:
    if n_a <= budget:
      return n_a, None
    if strategy == "only_second" and budget > 0:
      raise ValueError("truncation='only_second' needs pairs")
    return budget, None
  if n_a + n_b <= budget:
    return n_a, n_b
  if budget == 0:
    return 0, 0
  if strategy == "longest_first":
    swap = n_a > n_b
    short, long_ = (n_b, n_a) if swap else (n_a, n_b)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
      short = budget // 2
      long_ = short + budget % 2
    return (long_, short) if swap else (short, long_)
  remove = n_a + n_b - budget
  if strategy == "only_first":
    if remove >= n_a:
      raise ValueError(f"truncation='only_first' cannot fit a text of {n_a} tokens and a pair of "
                       f"{n_b} tokens into {budget} tokens")
    return n_a - remove, n_b
  if remove >= n_b:
    raise ValueError(f"truncation='only_second' cannot fit a text of {n_a} tokens and a pair of "
                     f"{n_b} tokens into {budget} tokens")
  return n_a, n_b - remove


class WordPieceTokenizer(Tokenizer):
  """BERT: basic tokenization (clean text, CJK split, punctuation split, lowercase and strip
  accents when uncased) then greedy longest-match-first WordPiece with `##`; words over 100
  characters become [UNK]."""

  def __init__(self, vocab: str | Path | dict[str, int], do_lower_case: bool = True,
               tokenize_chinese_chars: bool = True, strip_accents: bool | None = None,
               specials: dict[str, Special] | None = None):
    if not isinstance(vocab, dict):
      vocab = models.WordPiece.read_file(str(vocab))
    specials = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]",
                **(specials or {})}
    backend = hf.Tokenizer(models.WordPiece(
        vocab, unk_token=_content(specials["unk"]), continuing_subword_prefix="##",
        max_input_chars_per_word=100))
    # strip_accents=None means "follow lowercasing", as in the original BERT.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
        strip_accents=strip_accents, lowercase=do_lower_case)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    self.do_lower_case = do_lower_case
    super().__init__("wordpiece", backend, specials)


class XLMRTokenizer(Tokenizer):
  """XLM-R sentencepiece unigram with fairseq's ids: <s>=0 <pad>=1 </s>=2 <unk>=3, piece p>0 ->
  p+1, <mask> = pieces + 1; vocab_size = pieces + 2.

  The pieces, scores and normalisation table are read from the .model file; segmentation runs in
  `tokenizers` the way transformers 5.x's XLMRobertaTokenizer runs it (split on Unicode
  whitespace, prepend "▁" to every word, unigram Viterbi per word, consecutive unknown
  characters fused into one <unk>). That differs from calling sentencepiece directly on a few
  inputs: the whitespace set (U+0085 is whitespace here, a character for sentencepiece),
  unknown runs, and literal "<s>"/"<mask>" in the text, which become special ids here.
  """

  def __init__(self, model_file: str | Path, specials: dict[str, Special] | None = None):
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = proto.pieces
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    unknown, control = piece_type.UNKNOWN, piece_type.CONTROL
    if len(pieces) < 4 or pieces[0].type != unknown or any(p.type != control for p in pieces[1:3]):
      raise ValueError(f"{model_file}: expected sentencepiece ids 0, 1, 2 = <unk>, <s>, </s> (the "
                       "layout fairseq's XLM-R id mapping assumes)")
    specials = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>",
                **(specials or {})}
    names = {k: _content(v) for k, v in specials.items()}
    # spm ids 0..2 (<unk> <s> </s>) are replaced by the four fairseq specials, which shifts every
    # later piece by one; <mask> goes last.
    vocab = [(names[k], 0.0) for k in ("cls", "pad", "sep", "unk")]
    vocab += [(p.piece, p.score) for p in pieces[3:]] + [(names["mask"], 0.0)]
    backend = hf.Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if charsmap:
      backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Other control pieces are matched verbatim in text as special tokens, as in transformers.
    # User-defined pieces stay in the unigram vocabulary: Viterbi emits them whole inside a word,
    # as sentencepiece does ("a <ud>" -> "▁a", "▁", "<ud>"). As added tokens they would split the
    # text and restart the "▁" prefix after them (transformers did that before 5.2x).
    backend.add_tokens([hf.AddedToken(p.piece, normalized=False, special=True)
                        for p in pieces[3:] if p.type == control])
    super().__init__("xlmr", backend, specials)


class ByteBPETokenizer(Tokenizer):
  """RoBERTa / GPT-2 byte-level BPE: <s> A </s>, pair <s> A </s></s> B </s>, all types 0."""

  def __init__(self, vocab_file: str | Path, merges_file: str | Path,
               add_prefix_space: bool = False, trim_offsets: bool = True,
               specials: dict[str, Special] | None = None):
    vocab, merges = models.BPE.read_file(str(vocab_file), str(merges_file))
    specials = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>",
                **(specials or {})}
    backend = hf.Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="",
                                      end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    super().__init__("bpe", backend, specials)
    # Offsets of "Ġword" tokens cover " word" until this post-processor trims the space. It only
    # ever sees encodings without specials: our own template adds <s> and </s>.
    backend.post_processor = processors.RobertaProcessing(
        (_content(specials["sep"]), self.sep_id), (_content(specials["cls"]), self.cls_id),
        trim_offsets=trim_offsets, add_prefix_space=add_prefix_space)


def _check_str(text):
  if not isinstance(text, str):
    raise TypeError(f"expected a str, got {type(text).__name__}")
  return text


def _as_batch(texts, name: str) -> list[str]:
  if isinstance(texts, str):
    return [texts]
  if not isinstance(texts, Sequence):
    raise TypeError(f"{name} must be a str or a sequence of str, got {type(texts).__name__}")
  for t in texts:
    if not isinstance(t, str):
      raise TypeError(f"{name} must contain only str, got {type(t).__name__}")
  return list(texts)


# What `load` looks for, in the checkpoint directory; the first file set decides the kind.
_FILES = {"wordpiece": ("vocab.txt",), "xlmr": ("sentencepiece.bpe.model",),
          "bpe": ("vocab.json", "merges.txt")}
_CLASS_KIND = {"BertTokenizer": "wordpiece", "XLMRobertaTokenizer": "xlmr",
               "RobertaTokenizer": "bpe"}


def load(path: str | Path, config=None) -> Tokenizer:
  """The tokenizer an HF checkpoint directory ships, decided from its files, never from its name.

  vocab.txt -> WordPiece (options from tokenizer_config.json), sentencepiece.bpe.model -> XLM-R,
  vocab.json + merges.txt -> byte-level BPE; a tokenizer.json with a WordPiece model stands in for
  a missing vocab.txt. When several are present, `config.tokenizer` or tokenizer_config.json's
  tokenizer_class picks one. With a `config`, `check_fits` runs before returning.
  """
  root = Path(path)
  tok_cfg = {}
  if (root / "tokenizer_config.json").is_file():
    tok_cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
  found = [k for k, names in _FILES.items() if all((root / n).is_file() for n in names)]
  tok_json = None
  if "wordpiece" not in found and (root / "tokenizer.json").is_file():
    tok_json = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    if tok_json.get("model", {}).get("type") == "WordPiece":
      found.insert(0, "wordpiece")
  if not found:
    looked_for = [" + ".join(n) for n in _FILES.values()] + ["tokenizer.json (WordPiece)"]
    raise FileNotFoundError(f"no tokenizer files in {root}: looked for {', '.join(looked_for)}")
  kind = found[0]
  if len(found) > 1:
    hint = getattr(config, "tokenizer", None)
    if hint not in found:
      hint = _CLASS_KIND.get(str(tok_cfg.get("tokenizer_class", "")).removesuffix("Fast"))
    if hint not in found:
      raise ValueError(f"{root} has files for several tokenizers ({', '.join(found)}); pass a "
                       "config whose .tokenizer names one")
    kind = hint

  specials = _configured_specials(root, tok_cfg)
  if kind == "wordpiece":
    opts = {"do_lower_case": tok_cfg.get("do_lower_case",
                                         getattr(config, "do_lower_case", True)),
            "tokenize_chinese_chars": tok_cfg.get("tokenize_chinese_chars", True),
            "strip_accents": tok_cfg.get("strip_accents")}
    if (root / "vocab.txt").is_file():
      vocab = str(root / "vocab.txt")
    else:
      vocab = tok_json["model"]["vocab"]
      norm = tok_json.get("normalizer") or {}
      if norm.get("type") == "BertNormalizer":
        opts = {"do_lower_case": norm.get("lowercase", True),
                "tokenize_chinese_chars": norm.get("handle_chinese_chars", True),
                "strip_accents": norm.get("strip_accents")}
    tok = WordPieceTokenizer(vocab, specials=specials, **opts)
  elif kind == "xlmr":
    tok = XLMRTokenizer(root / "sentencepiece.bpe.model", specials=specials)
  else:
    tok = ByteBPETokenizer(root / "vocab.json", root / "merges.txt", specials=specials,
                           add_prefix_space=tok_cfg.get("add_prefix_space", False),
                           trim_offsets=tok_cfg.get("trim_offsets", True))
  if config is not None:
    check_fits(tok, config)
  return tok


def _configured_specials(root: Path, tok_cfg: dict) -> dict[str, hf.AddedToken]:
  """Special tokens named in tokenizer_config.json / special_tokens_map.json, as transformers
  reads them. Their flags matter: RoBERTa and XLM-R checkpoints ship <mask> with lstrip=True, so
  "a <mask>" has no separate space token before the mask."""
  smap = {}
  if (root / "special_tokens_map.json").is_file():
    smap = json.loads((root / "special_tokens_map.json").read_text(encoding="utf-8"))
  decoder = {v["content"]: v for v in (tok_cfg.get("added_tokens_decoder") or {}).values()
             if isinstance(v, dict) and "content" in v}
  out = {}
  for name in ("pad", "cls", "sep", "unk", "mask"):
    value = tok_cfg.get(f"{name}_token") or smap.get(f"{name}_token")
    if not value:
      continue
    spec = value if isinstance(value, dict) else decoder.get(str(value), {"content": str(value)})
    out[name] = hf.AddedToken(
        spec["content"], single_word=spec.get("single_word", False),
        lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
        normalized=spec.get("normalized", False), special=True)
  return out


def _content(tok: Special) -> str:
  return tok.content if isinstance(tok, hf.AddedToken) else tok


def check_fits(tok: Tokenizer, config) -> None:
  """Raises ValueError if `tok` cannot feed the model `config` describes.

  Fitting means tokenizer ids < embedding rows, not equality: Multilingual-MiniLM has 250037
  rows for XLM-R's 250002 ids (the extra rows are never looked up).
  """
  problems = []
  if tok.vocab_size > config.vocab_size:
    problems.append(f"tokenizer has {tok.vocab_size} ids but the model's embedding has "
                    f"{config.vocab_size} rows: wrong tokenizer for this checkpoint?")
  if tok.kind != config.tokenizer:
    problems.append(f"tokenizer is {tok.kind!r} but the model config expects "
                    f"{config.tokenizer!r}")
  if problems:
    raise ValueError("; ".join(problems))
