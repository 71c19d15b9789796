"""minilm_jax.squad: reading, windowed features against run_qa, and answer post-processing.

Features are compared with transformers' run_qa.py logic (its prepare_train_features /
prepare_validation_features, restated below on the fast tokenizer with return_overflowing_tokens
and stride) on the real all-MiniLM-L6-v2 WordPiece vocab; post-processing with utils_qa's
postprocess_qa_predictions, restated below, on random logits, and on hand-made logits whose
answer is known.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
import warnings

import numpy as np
import pytest

from minilm_jax import metrics, squad
from minilm_jax import tokenizer as tk


@pytest.fixture(scope="module")
def tok(gt_model_dir):
  return tk.load(gt_model_dir)


@pytest.fixture(scope="module")
def hf_tok(gt_model_dir):
  import transformers
  transformers.logging.set_verbosity_error()
  return transformers.BertTokenizerFast.from_pretrained(str(gt_model_dir))


def _ex(qid, context, question, answer=None, start=None, impossible=False):
  if answer is None:
    texts, starts = [], []
  else:
    texts, starts = [answer], [context.index(answer) if start is None else start]
  return {"id": qid, "title": "t", "context": context, "question": question,
          "answers": {"text": texts, "answer_start": starts}, "is_impossible": impossible}


PARIS = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
         "It is named after the engineer Gustave Eiffel, whose company designed and built the "
         "tower from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was constructed as "
         "the centerpiece of the 1889 World's Fair, and to crown the centennial anniversary of "
         "the French Revolution.")

WORDS = ("alpha beta gamma delta river mountain 1,234.5 café naïve Zürich 東京 über-cool don't "
         "Washington e-mail (parens) 3.14 U.S.A. co-operate ñandú the of and in Mississippi "
         "supercalifragilistic x").split()


def _generated(n, seed=0):
  """Contexts of random words; the answer is 1-4 whole words anywhere, also the last ones."""
  rng = random.Random(seed)
  out = []
  for k in range(n):
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 160))]
    starts, pos = [], 0
    for w in words:
      starts.append(pos)
      pos += len(w) + 1
    context = " ".join(words)
    a = len(words) - 1 if k % 5 == 0 else rng.randrange(len(words))
    b = min(len(words), a + rng.randint(1, 4))
    answer = " ".join(words[a:b])
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + "?"
    out.append(_ex(f"g{k}", context, question, answer, starts[a], impossible=k % 7 == 3))
    if k % 7 == 3:
      out[-1]["answers"] = {"text": [], "answer_start": []}
  return out


def _examples():
  hand = [
      _ex("h0", PARIS, "Who is the tower named after?", "Gustave Eiffel"),
      _ex("h1", PARIS, "   Where is the tower?", "Paris, France"),
      _ex("h2", PARIS, "What anniversary?", "the French Revolution"),
      _ex("h3", PARIS, "What is it?", "The Eiffel Tower"),
      _ex("h4", "The capital of France is Paris", "Capital?", "Paris"),  # last token of context
      _ex("h5", PARIS, "Which engineer?", "ustave", PARIS.index("ustave")),  # mid-word start
      _ex("h6", PARIS, "Is the moon made of cheese?", impossible=True),
  ]
  return hand + _generated(16)


# ---------------------------------------------------------------------- run_qa, restated


def run_qa_train(hf, examples, max_len, stride):
  """run_qa.py prepare_train_features (pad_on_right, padding=False)."""
  enc = hf([ex["question"].lstrip() for ex in examples], [ex["context"] for ex in examples],
           truncation="only_second", max_length=max_len, stride=stride,
           return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
  starts, ends = [], []
  for i, offsets in enumerate(enc["offset_mapping"]):
    input_ids = enc["input_ids"][i]
    cls_index = input_ids.index(hf.cls_token_id)
    sequence_ids = enc.sequence_ids(i)
    answers = examples[enc["overflow_to_sample_mapping"][i]]["answers"]
    if len(answers["answer_start"]) == 0:
      starts.append(cls_index)
      ends.append(cls_index)
      continue
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    token_start_index = 0
    while sequence_ids[token_start_index] != 1:
      token_start_index += 1
    token_end_index = len(input_ids) - 1
    while sequence_ids[token_end_index] != 1:
      token_end_index -= 1
    if not (offsets[token_start_index][0] <= start_char
            and offsets[token_end_index][1] >= end_char):
      starts.append(cls_index)
      ends.append(cls_index)
    else:
      while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
        token_start_index += 1
      starts.append(token_start_index - 1)
      while offsets[token_end_index][1] >= end_char:
        token_end_index -= 1
      ends.append(token_end_index + 1)
  offsets = [[o if s == 1 else None for o, s in zip(offs, enc.sequence_ids(i))]
             for i, offs in enumerate(enc["offset_mapping"])]
  return enc, starts, ends, offsets


def utils_qa_postprocess(examples, owner, offsets, all_start, all_end, n_best, max_len, v2,
                         threshold):
  """utils_qa.py postprocess_qa_predictions (no token_is_max_context)."""
  preds, diffs = {}, {}
  for i, ex in enumerate(examples):
    min_null, prelim = None, []
    for f in np.flatnonzero(owner == i):
      s, e, offs = all_start[f], all_end[f], offsets[f]
      null = s[0] + e[0]
      if min_null is None or min_null["score"] > null:
        min_null = {"offsets": (0, 0), "score": null, "start_logit": s[0], "end_logit": e[0]}
      for a in np.argsort(s)[-1:-n_best - 1:-1].tolist():
        for b in np.argsort(e)[-1:-n_best - 1:-1].tolist():
          if offs[a] is None or offs[b] is None or b < a or b - a + 1 > max_len:
            continue
          prelim.append({"offsets": (offs[a][0], offs[b][1]), "score": s[a] + e[b],
                         "start_logit": s[a], "end_logit": e[b]})
    if v2:
      prelim.append(min_null)
    best = sorted(prelim, key=lambda x: x["score"], reverse=True)[:n_best]
    if v2 and not any(p["offsets"] == (0, 0) for p in best):
      best.append(min_null)
    for p in best:
      p["text"] = ex["context"][p["offsets"][0]:p["offsets"][1]]
    if not best or (len(best) == 1 and best[0]["text"] == ""):
      best.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
    if not v2:
      preds[ex["id"]] = best[0]["text"]
      continue
    k = 0
    while best[k]["text"] == "":
      k += 1
    diff = min_null["score"] - best[k]["start_logit"] - best[k]["end_logit"]
    diffs[ex["id"]] = float(diff)
    preds[ex["id"]] = "" if diff > threshold else best[k]["text"]
  return preds, diffs


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize("max_len,stride", [(384, 128), (64, 16), (40, 8)])
def test_features_match_run_qa(tok, hf_tok, max_len, stride):
  examples = _examples()
  enc, ref_starts, ref_ends, ref_offsets = run_qa_train(hf_tok, examples, max_len, stride)
  train = squad.prepare_train_features(examples, tok, max_seq_length=max_len, doc_stride=stride)
  evalf = squad.prepare_eval_features(examples, tok, max_seq_length=max_len, doc_stride=stride)
  assert len(train["input_ids"]) == len(enc["input_ids"])
  np.testing.assert_array_equal(train["example_index"], enc["overflow_to_sample_mapping"])
  for k in ("input_ids", "attention_mask", "token_type_ids", "example_index"):
    np.testing.assert_array_equal(train[k], evalf[k])
  edge_cases = 0
  for f, ids in enumerate(enc["input_ids"]):
    n = len(ids)
    assert train["input_ids"][f, :n].tolist() == ids
    assert train["token_type_ids"][f, :n].tolist() == enc["token_type_ids"][f]
    assert train["attention_mask"][f].sum() == n and not train["input_ids"][f, n:].any()
    got = [None if o[0] < 0 else tuple(o) for o in evalf["offsets"][f, :n].tolist()]
    assert got == ref_offsets[f] and (evalf["offsets"][f, n:] == -1).all()
    start, end = train["start_positions"][f], train["end_positions"][f]
    if ref_starts[f] > ref_ends[f]:
      # run_qa's edge case: the answer starts at the window's last context token and its scan
      # runs on into [SEP]. Ours stops at that token.
      edge_cases += 1
      assert (start, end) == (ref_ends[f], ref_ends[f]) and ref_offsets[f][start] is not None
    else:
      assert (start, end) == (ref_starts[f], ref_ends[f]), f
  assert edge_cases >= 1  # h4 at least: "Paris" ends its context
  # The labels are not all [CLS]: the comparison says something.
  assert (train["start_positions"] > 0).sum() >= 15


def test_train_positions_decode_to_the_answer(tok):
  examples = [ex for ex in _examples() if ex["id"] != "h5"]  # h5 starts mid-word
  kw = dict(max_seq_length=48, doc_stride=12)
  train = squad.prepare_train_features(examples, tok, **kw)
  offsets = squad.prepare_eval_features(examples, tok, **kw)["offsets"]
  found = set()
  for f, i in enumerate(train["example_index"]):
    ex, s, e = examples[i], train["start_positions"][f], train["end_positions"][f]
    if s == 0:
      assert e == 0
      continue
    assert not ex["is_impossible"] and s <= e
    text = ex["context"][offsets[f, s, 0]:offsets[f, e, 1]]
    assert text == ex["answers"]["text"][0]
    assert metrics.normalize_answer(text) == metrics.normalize_answer(ex["answers"]["text"][0])
    found.add(ex["id"])
  answerable = {ex["id"] for ex in examples if not ex["is_impossible"]}
  # Every answer (at most 4 words, well under a window) is labelled in at least one window.
  assert found == answerable


def test_windows_cover_the_context_with_stride_overlap(tok):
  examples = _examples()
  stride = 8
  feats = squad.prepare_eval_features(examples, tok, max_seq_length=40, doc_stride=stride)
  full = tok([ex["context"] for ex in examples], padding="do_not_pad", return_offsets=True)
  multi = 0
  for i, _ in enumerate(examples):
    want = [tuple(o) for o, s in zip(full["offsets"][i], full["sequence_ids"][i]) if s == 0]
    windows = [[tuple(o) for o in feats["offsets"][f].tolist() if o[0] >= 0]
               for f in np.flatnonzero(feats["example_index"] == i)]
    multi += len(windows) > 1
    covered = list(windows[0])
    for prev, nxt in zip(windows, windows[1:]):
      assert len(prev) == len(windows[0])  # every window but the last is full
      assert prev[-stride:] == nxt[:stride]  # consecutive windows share exactly `stride` tokens
      covered += nxt[stride:]
    assert covered == want
  assert multi >= 10


def test_question_truncation_and_padding(tok):
  long_q = " ".join(["question"] * 100)
  ex = [_ex("q", PARIS, long_q, "Gustave Eiffel")]
  feats = squad.prepare_train_features(ex, tok, max_query_length=64, pad_to=512)
  assert feats["input_ids"].shape == (1, 512) and feats["input_ids"].dtype == np.int32
  ids = feats["input_ids"][0].tolist()
  assert ids[:66] == [tok.cls_id] + tok.encode(long_q)[:64] + [tok.sep_id]
  assert feats["token_type_ids"][0, 66] == 1
  with pytest.raises(ValueError, match="pad_to"):
    squad.prepare_train_features(ex, tok, max_seq_length=384, pad_to=64)
  with pytest.raises(ValueError, match="no room for context"):
    squad.prepare_train_features(ex, tok, max_seq_length=60, max_query_length=100)
  with pytest.raises(ValueError, match="doc_stride"):
    squad.prepare_train_features(ex, tok, max_seq_length=40, doc_stride=30, max_query_length=8)
  empty = squad.prepare_eval_features([], tok, max_seq_length=32)
  assert empty["input_ids"].shape == (0, 32) and empty["offsets"].shape == (0, 32, 2)


# ------------------------------------------------------------------------ post-processing


def _span_tokens(feats, f, ex):
  """Token indices of the answer's first and last character in feature f, or None."""
  offs = feats["offsets"][f]
  a = ex["answers"]["answer_start"][0]
  b = a + len(ex["answers"]["text"][0])
  s = np.flatnonzero((offs[:, 0] <= a) & (offs[:, 1] > a))
  e = np.flatnonzero((offs[:, 0] < b) & (offs[:, 1] >= b))
  return (int(s[0]), int(e[0])) if len(s) and len(e) else None


def _pointing(feats, spans, shape_value=0.0):
  """Logits that are `shape_value` everywhere and 10 at each feature's given (start, end)."""
  start = np.full(feats["input_ids"].shape, shape_value, np.float32)
  end = start.copy()
  for f, (s, e) in spans.items():
    start[f, s], end[f, e] = 10.0, 10.0
  return start, end


def test_postprocess_recovers_answers_in_the_second_window_only(tok):
  filler = " ".join(f"filler{k}" for k in range(40))
  ctx = f"{filler}. The treasure is buried under the old oak tree"
  ex = [_ex("x", ctx, "Where is the treasure?", "under the old oak tree"),
        _ex("y", PARIS, "Who designed it?", "Gustave Eiffel")]
  feats = squad.prepare_eval_features(ex, tok, max_seq_length=64, doc_stride=16)
  fx = np.flatnonzero(feats["example_index"] == 0)
  assert len(fx) >= 2 and _span_tokens(feats, fx[0], ex[0]) is None
  spans = {f: _span_tokens(feats, f, ex[feats["example_index"][f]])
           for f in range(len(feats["input_ids"]))}
  spans = {f: s for f, s in spans.items() if s is not None}
  assert set(spans) & set(fx) == {fx[-1]}
  start, end = _pointing(feats, spans)
  preds, null_scores = squad.postprocess(ex, feats, start, end)
  assert preds == {"x": "under the old oak tree", "y": "Gustave Eiffel"}
  assert null_scores["x"] == pytest.approx(0.0 - 20.0)
  assert metrics.squad_metrics(preds, squad.references(ex))["exact_match"] == 100.0
  # The first window points confidently at a span of its own: the better window still wins.
  other = {fx[0]: (20, 22)}
  start2, end2 = _pointing(feats, {**spans, **other})
  start2[fx[0], 20], end2[fx[0], 22] = 9.0, 9.0
  assert squad.postprocess(ex, feats, start2, end2)[0]["x"] == "under the old oak tree"
  start2[fx[0], 20], end2[fx[0], 22] = 11.0, 11.0
  assert squad.postprocess(ex, feats, start2, end2)[0]["x"] != "under the old oak tree"


def test_postprocess_null_answer_and_threshold(tok):
  ex = [_ex("n", PARIS, "Is the moon made of cheese?", impossible=True)]
  feats = squad.prepare_eval_features(ex, tok)
  s, e = _span_tokens(feats, 0, _ex("n", PARIS, "", "Gustave Eiffel"))
  start = np.zeros(feats["input_ids"].shape, np.float32)
  end = start.copy()
  start[0, s], end[0, e] = 3.0, 3.0  # best span 6
  start[0, 0], end[0, 0] = 5.0, 5.0  # null 10
  preds, null_scores = squad.postprocess(ex, feats, start, end, version_2=True)
  assert preds == {"n": ""} and null_scores["n"] == pytest.approx(4.0)
  preds, _ = squad.postprocess(ex, feats, start, end, version_2=True, null_threshold=100.0)
  assert preds == {"n": "Gustave Eiffel"}
  # "" only when the difference is strictly above the threshold.
  preds, _ = squad.postprocess(ex, feats, start, end, version_2=True, null_threshold=4.0)
  assert preds == {"n": "Gustave Eiffel"}
  # v1 never answers "": the null score is reported, not used.
  assert squad.postprocess(ex, feats, start, end)[0] == {"n": "Gustave Eiffel"}
  assert metrics.squad_metrics({"n": ""}, squad.references(ex))["exact_match"] == 100.0
  # The span beats the null (diff -4): answered at threshold 0, "" at a large negative one.
  start[0, 0], end[0, 0] = 1.0, 1.0
  assert squad.postprocess(ex, feats, start, end, version_2=True)[0] == {"n": "Gustave Eiffel"}
  preds, _ = squad.postprocess(ex, feats, start, end, version_2=True, null_threshold=-100.0)
  assert preds == {"n": ""}


def test_postprocess_null_score_is_the_minimum_over_windows(tok):
  filler = " ".join(f"word{k}" for k in range(60))
  ex = [_ex("m", filler, "Which?", "word7")]
  feats = squad.prepare_eval_features(ex, tok, max_seq_length=48, doc_stride=8)
  n_feat = len(feats["input_ids"])
  assert n_feat >= 3
  start = np.zeros(feats["input_ids"].shape, np.float32)
  end = start.copy()
  start[:, 0] = np.arange(n_feat) + 5.0
  end[:, 0] = 5.0
  s, e = _span_tokens(feats, 0, ex[0])
  start[0, s], end[0, e] = 4.0, 4.0
  preds, nulls = squad.postprocess(ex, feats, start, end, version_2=True)
  assert nulls["m"] == pytest.approx(10.0 - 8.0) and preds["m"] == ""


def test_postprocess_max_answer_length_and_n_best(tok):
  ex = [_ex("a", PARIS, "Where?", "Champ de Mars in Paris, France")]
  feats = squad.prepare_eval_features(ex, tok)
  s, e = _span_tokens(feats, 0, ex[0])
  length = e - s + 1
  assert length >= 5
  start = np.zeros(feats["input_ids"].shape, np.float32)
  end = start.copy()
  start[0, s], end[0, e] = 10.0, 10.0
  end[0, s + 1] = 8.0  # "Champ de": shorter, scores 18 < 20
  kw = dict(n_best=20)
  assert squad.postprocess(ex, feats, start, end, max_answer_length=length, **kw)[0]["a"] == (
      "Champ de Mars in Paris, France")
  assert squad.postprocess(ex, feats, start, end, max_answer_length=length - 1, **kw)[0]["a"] == (
      "Champ de")
  # n_best: the top start logit sits on a question token, which is never an answer. With n_best=1
  # no valid pair is left (answer ""); with 2 the second-best start gives the answer.
  start[0, 2] = 50.0
  assert squad.postprocess(ex, feats, start, end, n_best=1)[0]["a"] == ""
  assert squad.postprocess(ex, feats, start, end, n_best=2)[0]["a"] == (
      "Champ de Mars in Paris, France")
  # end < start is never proposed: (e, s) scores 200, the best valid pair is (s, s) with 101.
  start2 = np.full_like(start, -50.0)
  end2 = np.full_like(end, -50.0)
  start2[0, e], end2[0, s], start2[0, s] = 100.0, 100.0, 1.0
  assert squad.postprocess(ex, feats, start2, end2)[0]["a"] == "Champ"


@pytest.mark.parametrize("v2,n_best,max_len,ties", [
    (False, 20, 30, False), (True, 20, 30, False), (True, 3, 4, False), (False, 5, 2, False),
    (False, 20, 30, True), (True, 20, 30, True)])
def test_postprocess_matches_utils_qa_on_random_logits(tok, v2, n_best, max_len, ties):
  examples = _examples()
  feats = squad.prepare_eval_features(examples, tok, max_seq_length=64, doc_stride=16)
  rng = np.random.default_rng(n_best + max_len)
  shape = feats["input_ids"].shape
  if ties:
    # Small integers: equal scores everywhere, so the order in which candidates are visited
    # (start-major, first window first) decides. float64, as postprocess computes.
    start = rng.integers(-3, 3, shape).astype(np.float64)
    end = rng.integers(-3, 3, shape).astype(np.float64)
  else:
    start = rng.normal(size=shape).astype(np.float32)
    end = rng.normal(size=shape).astype(np.float32)
  # Null and span scores close: both outcomes occur (with ties, also diff == threshold).
  start[:, 0] += 3.0 if ties else 1.5
  end[:, 0] += 3.0 if ties else 1.5
  offsets = [[None if o[0] < 0 else tuple(o) for o in row.tolist()] for row in feats["offsets"]]
  ref, ref_diff = utils_qa_postprocess(examples, feats["example_index"], offsets, start, end,
                                       n_best, max_len, v2, 0.0)
  got, diff = squad.postprocess(examples, feats, start, end, n_best=n_best,
                                max_answer_length=max_len, version_2=v2)
  assert got == {k: "" if v == "empty" else v for k, v in ref.items()}
  for k, v in ref_diff.items():
    if diff[k] == np.inf:
      # No valid span in any window: utils_qa scores its "empty" placeholder as 0.
      assert ref[k] in ("", "empty") and got[k] == ""
    else:
      assert diff[k] == pytest.approx(v, rel=1e-6)
  if v2:
    assert 0 < sum(v == "" for v in got.values()) < len(got)


def test_postprocess_rejects_mismatched_inputs(tok):
  ex = [_ex("a", PARIS, "Where?", "Paris")]
  feats = squad.prepare_eval_features(ex, tok, max_seq_length=64, doc_stride=16)
  shape = feats["input_ids"].shape
  with pytest.raises(ValueError, match="do not match"):
    squad.postprocess(ex, feats, np.zeros((shape[0], shape[1] - 1)), np.zeros(shape))
  with pytest.raises(ValueError, match="outside"):
    squad.postprocess([], feats, np.zeros(shape), np.zeros(shape))
  with pytest.raises(ValueError, match="no features"):
    squad.postprocess(ex + [_ex("b", "x", "y")], feats, np.zeros(shape), np.zeros(shape))


# ------------------------------------------------------------------------------- reading


def _squad_file(tmp_path, data, name="squad.json"):
  path = tmp_path / name
  path.write_text(json.dumps({"version": "v2.0", "data": data}), encoding="utf-8")
  return path


DATA = [
    {"title": "Eiffel", "paragraphs": [{"context": PARIS, "qas": [
        {"id": "q1", "question": "Who?", "is_impossible": False,
         "answers": [{"text": "Gustave Eiffel", "answer_start": PARIS.index("Gustave")},
                     {"text": "Eiffel", "answer_start": PARIS.index("Eiffel,")}]},
        {"id": "q2", "question": "Cheese?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "tower", "answer_start": 23}]}]}]},
    {"title": "Tiny", "paragraphs": [{"context": "abc def", "qas": [
        {"id": "q3", "question": "x?", "answers": [{"text": "def", "answer_start": 4}]}]}]},
]


def test_read_squad_json_and_from_tfds(tmp_path):
  got = squad.read_squad_json(_squad_file(tmp_path, DATA))
  assert [ex["id"] for ex in got] == ["q1", "q2", "q3"]
  assert got[0] == {"id": "q1", "title": "Eiffel", "context": PARIS, "question": "Who?",
                    "answers": {"text": ["Gustave Eiffel", "Eiffel"],
                                "answer_start": [PARIS.index("Gustave"), PARIS.index("Eiffel,")]},
                    "is_impossible": False}
  assert got[1]["is_impossible"] and got[1]["answers"] == {"text": [], "answer_start": []}
  assert got[2]["title"] == "Tiny" and not got[2]["is_impossible"]
  assert squad.references(got) == {"q1": ["Gustave Eiffel", "Eiffel"], "q2": [], "q3": ["def"]}
  # The same data as tfds.as_numpy yields squad/v2.0 records (bytes, object and int32 arrays).
  records = []
  for ex in got:
    records.append({
        "id": ex["id"].encode(), "title": ex["title"].encode(), "context": ex["context"].encode(),
        "question": ex["question"].encode(), "is_impossible": np.bool_(ex["is_impossible"]),
        "answers": {"text": np.array([t.encode() for t in ex["answers"]["text"]], object),
                    "answer_start": np.array(ex["answers"]["answer_start"], np.int32)},
        "plausible_answers": {"text": np.array([], object),
                              "answer_start": np.array([], np.int32)}})
  del records[2]["is_impossible"]  # mlqa / squad v1.1 records have no such field
  assert squad.from_tfds(records) == got
  # Non-ASCII text survives the bytes round trip; offsets stay character offsets.
  ctx = "Zürich liegt in der Schweiz"
  rec = {"id": b"z", "context": ctx.encode(), "question": b"Wo?",
         "answers": {"text": np.array([b"Schweiz"], object),
                     "answer_start": np.array([ctx.index("Schweiz")], np.int32)}}
  assert squad.from_tfds([rec])[0]["answers"]["text"] == ["Schweiz"]


def _broken(mutate):
  data = json.loads(json.dumps(DATA))
  mutate(data)
  return data


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[0].pop("paragraphs"), r"data\[0\] has no 'paragraphs'"),
    (lambda d: d[1]["paragraphs"][0].pop("context"),
     r"data\[1\]\.paragraphs\[0\] has no 'context'"),
    (lambda d: d[0]["paragraphs"][0].pop("qas"), r"paragraphs\[0\] has no 'qas'"),
    (lambda d: d[0]["paragraphs"][0]["qas"][1].pop("id"), r"qas\[1\] has no 'id'"),
    (lambda d: d[0]["paragraphs"][0]["qas"][0].pop("question"), r"qas\[0\] has no 'question'"),
    (lambda d: d[0]["paragraphs"][0]["qas"][0].pop("answers"), r"qas\[0\] has no 'answers'"),
    (lambda d: d[0]["paragraphs"][0]["qas"][0]["answers"][1].pop("text"),
     r"qas\[0\]\.answers\[1\] has no 'text'"),
    (lambda d: d[1]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="4"),
     r"answers\[0\]\.answer_start is a str, expected int"),
    (lambda d: d[1]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=99),
     r"answer_start=99 is outside the context"),
    (lambda d: d[1]["paragraphs"][0]["qas"][0].update(id="q1"), r"repeats the id 'q1'"),
    (lambda d: d[0]["paragraphs"][0]["qas"][1].update(
        answers=[{"text": "x", "answer_start": 0}]), r"is_impossible but has answers"),
    (lambda d: d[0]["paragraphs"][0].update(qas={"id": "q"}), r"qas is a dict, expected list"),
    (lambda d: d.append("not an article"), r"data\[2\] is a str, expected an object"),
])
def test_read_squad_json_errors_name_file_and_place(tmp_path, mutate, message):
  path = _squad_file(tmp_path, _broken(mutate), "broken.json")
  with pytest.raises(ValueError, match=message) as err:
    squad.read_squad_json(path)
  assert "broken.json" in str(err.value)


def test_read_squad_json_rejects_non_squad_files(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    squad.read_squad_json(bad)
  bad.write_text(json.dumps({"version": "1.1", "articles": []}), encoding="utf-8")
  with pytest.raises(ValueError, match="bad.json: expected a JSON object with a 'data' list"):
    squad.read_squad_json(bad)


def test_answer_text_mismatch_warns_or_raises(tmp_path):
  data = _broken(lambda d: d[1]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=3))
  path = _squad_file(tmp_path, data, "shifted.json")
  with pytest.warns(UserWarning, match=r"shifted.json: 1 of 3 answers do not match"):
    got = squad.read_squad_json(path)
  assert got[2]["answers"]["answer_start"] == [3]  # kept, as run_qa keeps it
  with pytest.raises(ValueError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]"):
    squad.read_squad_json(path, strict=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    squad.read_squad_json(_squad_file(tmp_path, DATA))  # clean data: no warning
