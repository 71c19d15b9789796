"""Property tests: minilm_jax.tokenizer equals transformers on random Unicode text.

Hypothesis draws texts (any code point but surrogates, mixed with the hand-picked hard cases of
test_tokenizer.BASE), pairs, lengths and strategies; every tokenizer set-up of test_tokenizer.py
must give the transformers reference's ids, token types, mask, offsets and sequence ids, or fail
exactly when the reference fails.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# The builders live in test_tokenizer.py; load it by path so this works in any pytest import mode.
_spec = importlib.util.spec_from_file_location(
    "_tokenizer_test_builders", Path(__file__).with_name("test_tokenizer.py"))
builders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builders)

SETTINGS = settings(max_examples=100, deadline=None, database=None)

chars = st.characters(exclude_categories=("Cs",))
fragment = st.one_of(st.text(chars, max_size=30), st.sampled_from(builders.BASE),
                     st.sampled_from([" ", "  ", "\t", "\n", "\u200b", "\u3000", "##", "▁", "Ġ"]))
texts = st.lists(fragment, max_size=5).map("".join)


@pytest.fixture(scope="module", params=builders.KINDS)
def both(request, tmp_path_factory):
  return builders.build(request.param, tmp_path_factory.mktemp(request.param))


def _ref_or_error(ref, a, b, **kw):
  try:
    return builders.ref_call(ref, a, b, **kw)
  except Exception as err:  # transformers surfaces tokenizers' truncation errors as Exception
    return err


@SETTINGS
@given(batch=st.lists(texts, min_size=1, max_size=4))
def test_single_texts(both, batch):
  ours, ref = both
  builders.assert_same(ours(batch), builders.ref_call(ref, batch, padding="longest"), repr(batch))


@SETTINGS
@given(data=st.data(), batch=st.lists(st.tuples(texts, texts), min_size=1, max_size=3),
       strategy=st.sampled_from(["longest_first", "only_first", "only_second"]),
       padding=st.sampled_from(["longest", "max_length"]))
def test_pairs_truncated(both, data, batch, strategy, padding):
  ours, ref = both
  max_length = data.draw(st.integers(ours.num_special_tokens(pair=True), 48), "max_length")
  a, b = map(list, zip(*batch))
  kw = dict(max_length=max_length, padding=padding)
  expected = _ref_or_error(ref, a, b, truncation=strategy, **kw)
  if isinstance(expected, Exception):
    with pytest.raises(ValueError, match="cannot fit"):
      ours(a, b, truncation=strategy, **kw)
  else:
    builders.assert_same(ours(a, b, truncation=strategy, **kw), expected, repr(batch))


@SETTINGS
@given(a=texts, b=texts, max_length=st.one_of(st.none(), st.integers(4, 40)))
def test_offsets(both, a, b, max_length):
  ours, ref = both
  trunc = {} if max_length is None else {"max_length": max_length, "truncation": "longest_first"}
  out = ours([a], [b], return_offsets=True, **trunc)
  enc = ref([a], [b], return_offsets_mapping=True, **trunc)
  n = len(enc["input_ids"][0])
  assert out["input_ids"][0].tolist() == enc["input_ids"][0]
  assert out["offsets"][0].tolist() == [list(o) for o in enc["offset_mapping"][0]]
  assert out["sequence_ids"][0].tolist() == [-1 if s is None else s for s in enc.sequence_ids(0)]
  for (start, end), sid in zip(out["offsets"][0, :n], out["sequence_ids"][0]):
    limit = (len(a), len(b))[sid] if sid >= 0 else 0
    assert 0 <= start <= end <= limit


@SETTINGS
@given(text=texts)
def test_encode_decode(both, text):
  ours, ref = both
  ids = ours.encode(text)
  assert ids == ref.encode(text, add_special_tokens=False)
  assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  assert np.all(np.asarray(ids, np.int64) < ours.vocab_size)
