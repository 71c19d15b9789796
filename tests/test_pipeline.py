"""Preparation (Beam -> ArrayRecord + manifest) and the Grain pipelines over it.

Tokenised with the packaged all-MiniLM-L6-v2 WordPiece vocabulary (conftest's gt_model_dir);
Beam runs in-process here (one split a corpus unless a test asks for more).
"""

import json
import os
import pickle

import numpy as np
import pytest
from conftest import write_tiny_vocab

from minilm_jax import data, tokenizer
from minilm_jax.data import shards

WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly hex a jovial "
         "frog near river banks under moonlight and everyone sings").split()
IN_PROCESS = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]


def lines(n, seed=0, max_words=60):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, rng.integers(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(gt_model_dir):
  return tokenizer.load(gt_model_dir)


def prepare(tmp_path, gt_model_dir, source, name="prep", max_length=64, **kw):
  return data.prepare_corpus(source, tmp_path / name, tokenizer_path=gt_model_dir,
                             max_length=max_length, beam_args=kw.pop("beam_args", IN_PROCESS),
                             **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gt_model_dir):
  """103 lines of 1-59 words in 4 shards (split_bytes small)."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "c.txt").write_text("\n".join(lines(103)) + "\n")
  return prepare(root, gt_model_dir, data.Source("text", paths=(str(root / "c.txt"),)),
                 split_bytes=2000)


def test_records_are_the_tokenizers_ids(corpus, tok, tmp_path):
  texts = lines(103)
  ref = tok(texts, max_length=64, padding="do_not_pad", return_truncated=True)
  src = corpus.source()
  m = corpus.manifest
  assert len(m["shards"]) > 1 and m["examples"] == 103 == len(src)
  assert m["truncated"] == int(ref["truncated"].sum()) > 0
  assert m["tokens"] == sum(map(len, ref["input_ids"]))
  for i in range(103):  # record i is line i, whichever shard holds it
    ids, types, label = shards.decode_record(src[i])
    assert ids.tolist() == ref["input_ids"][i] and types.tolist() == ref["token_type_ids"][i]
    assert np.isnan(label)
  assert np.asarray(corpus.lengths()).tolist() == [len(r) for r in ref["input_ids"]]
  assert m["fingerprint"] == shards.fingerprint(tok, 64)
  keys = np.random.default_rng(0).permutation(103)  # a batched read in any order, and after
  assert src.__getitems__(keys) == [src[int(k)] for k in keys]  # pickling (Grain workers)
  assert pickle.loads(pickle.dumps(src)).__getitems__(keys[:9]) == [src[int(k)] for k in keys[:9]]
  with pytest.raises(IndexError, match="outside its 103 records"):
    src[103]
  assert not list(corpus.path.glob(".*")), "temporary files left behind"


def test_pairs_labels_and_tsv(tmp_path, gt_model_dir, tok):
  rows = ["text\tpair\tlabel", "a fox\tthe dog\tpos", "seven frogs\tnear banks\tneg",
          "the river\tsings\tpos"]
  (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
  src = data.Source("tsv", paths=(str(tmp_path / "t.tsv"),), pair_column="pair",
                    label_column="label")
  p = prepare(tmp_path, gt_model_dir, src)
  assert p.label_names == ["neg", "pos"] and p.manifest["labels"] == "class"
  ref = tok(["a fox", "seven frogs", "the river"], ["the dog", "near banks", "sings"],
            padding="do_not_pad")
  batch = next(iter(data.BucketedBatches(p, batch_size=4, buckets=(16,), shuffle=False)))
  assert batch["labels"].tolist() == [1, 0, 1, 0] and batch["weights"].tolist() == [1, 1, 1, 0]
  for r in range(3):
    n = len(ref["input_ids"][r])
    assert batch["input_ids"][r, :n].tolist() == ref["input_ids"][r]
    assert batch["token_type_ids"][r, :n].tolist() == ref["token_type_ids"][r]
    assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (16 - n)
  # Regression targets come back as float32.
  (tmp_path / "r.jsonl").write_text('{"text": "a", "y": 0.5}\n{"text": "b c", "y": 2.25}\n')
  reg = prepare(tmp_path, gt_model_dir, data.Source(
      "jsonl", paths=(str(tmp_path / "r.jsonl"),), label_column="y", regression=True), "reg")
  batch = next(iter(data.BucketedBatches(reg, batch_size=2, buckets=(8,), shuffle=False)))
  assert batch["labels"].dtype == np.float32 and batch["labels"].tolist() == [0.5, 2.25]


def test_documents_are_cut_into_windows(tmp_path, gt_model_dir, tok):
  doc = " ".join(lines(1, max_words=200)[0].split() * 2)
  (tmp_path / "d.txt").write_text(f"{doc}\nmore of it\n\n\nshort doc\n")
  p = prepare(tmp_path, gt_model_dir, data.Source("documents", paths=(str(tmp_path / "d.txt"),)),
              max_length=32)
  ids = tok.encode(doc + " more of it")
  want = -(-len(ids) // 30) + 1
  assert p.num_examples == want and p.manifest["truncated"] == 0
  got = [shards.decode_record(p.source()[i])[0] for i in range(want)]
  assert all(len(g) <= 32 and g[0] == tok.cls_id and g[-1] == tok.sep_id for g in got)
  assert np.concatenate([g[1:-1] for g in got[:-1]]).tolist() == ids  # nothing lost


@pytest.mark.parametrize("shuffle", [True, False])
def test_bucketed_fixed_shapes_every_example_once(corpus, shuffle):
  b = data.BucketedBatches(corpus, batch_size=8, buckets=(16, 32, 64), shuffle=shuffle)
  assert b.batches_per_epoch == 13  # ceil(103 / 8), as HF's
  lengths = np.asarray(corpus.lengths())
  it = iter(b)
  for _ in range(2):
    seen = []
    for _ in range(b.batches_per_epoch):
      batch = next(it)
      n, length = batch["input_ids"].shape
      assert n == 8 and length in (16, 32, 64)
      real = batch["index"][batch["weights"] > 0]
      assert lengths[real].max() <= length and (batch["index"][batch["weights"] == 0] == -1).all()
      seen += real.tolist()
    assert sorted(seen) == list(range(103))


def test_drop_remainder_and_order(corpus):
  drop = data.BucketedBatches(corpus, batch_size=8, buckets=(16, 32, 64), drop_remainder=True)
  assert drop.batches_per_epoch == sum(c // 8 for c in drop._counts)
  assert all(b["weights"].all() for b in drop.iter_epoch())
  flat = lambda b, k=13: np.concatenate([next(it)["index"] for it in [iter(b)] for _ in range(k)])
  a = flat(data.BucketedBatches(corpus, batch_size=8, seed=3))
  assert (a == flat(data.BucketedBatches(corpus, batch_size=8, seed=3))).all()
  assert not (a == flat(data.BucketedBatches(corpus, batch_size=8, seed=4))).all()
  two = flat(data.BucketedBatches(corpus, batch_size=8, seed=3), 26)
  assert not (two[:104] == two[104:]).all()  # each epoch its own permutation


@pytest.mark.parametrize("kind", ["bucketed", "packed"])
@pytest.mark.parametrize("at", [3, 13])
def test_state_resumes_exactly(corpus, kind, at):
  make = (lambda: data.BucketedBatches(corpus, batch_size=8, seed=7)) if kind == "bucketed" \
      else (lambda: data.PackedBatches(corpus, batch_size=4, seq_len=64, seed=7))
  straight = make()
  it = iter(straight)
  want = [next(it) for _ in range(at + 6)]
  first = make()
  it = iter(first)
  for _ in range(at):
    next(it)
  state = json.loads(json.dumps(first.state()))  # it travels as JSON in the checkpoint
  resumed = make()
  resumed.restore(state)
  got = [b for _, b in zip(range(6), resumed)]
  for w, g in zip(want[at:], got, strict=True):
    assert w.keys() == g.keys() and all(np.array_equal(w[k], g[k]) for k in w)


def test_packed_rows(corpus, tok):
  p = data.PackedBatches(corpus, batch_size=4, seq_len=128, seed=0, pad_id=tok.pad_id)
  src = corpus.source()
  batch = next(iter(p))
  assert batch["input_ids"].shape == (4, 128)
  for r in range(4):
    seg, keys = batch["segment_ids"][r], batch["example_index"][r]
    assert seg.max() >= 2  # several examples a row
    for s in range(1, seg.max() + 1):
      ids = shards.decode_record(src[int(keys[seg == s][0])])[0]
      assert (keys[seg == s] == keys[seg == s][0]).all()
      assert batch["input_ids"][r][seg == s].tolist() == ids.tolist()
    assert (batch["input_ids"][r][seg == 0] == tok.pad_id).all()
    assert (keys[seg == 0] == -1).all() and (batch["attention_mask"][r] == (seg > 0)).all()


def test_packing_pads_less_than_buckets(corpus):
  packed = data.PackedBatches(corpus, batch_size=8, seq_len=64, seed=0)
  seg = np.concatenate([b["segment_ids"] for _, b in zip(range(20), packed)])
  bucketed = data.BucketedBatches(corpus, batch_size=8, buckets=(16, 32, 64))
  assert (seg == 0).mean() < 0.5 * bucketed.padding_fraction()


def test_packed_shards_are_disjoint_and_cover_the_epoch(corpus):
  """2 processes x 1 shard each read what 1 process with 2 shards reads: disjoint rows, union
  the whole corpus, the same batches concatenated."""
  one = data.PackedBatches(corpus, batch_size=8, seq_len=64, seed=1, num_shards=2)
  hosts = [data.PackedBatches(corpus, batch_size=8, seq_len=64, seed=1, process_index=i,
                              process_count=2) for i in range(2)]
  for _, b, h0, h1 in zip(range(5), one, *hosts):
    for k in b:
      np.testing.assert_array_equal(b[k], np.concatenate([h0[k], h1[k]]))
  keys = [set(np.asarray(h._shard_keys(s)).tolist()) for h, s in zip(hosts, (0, 1))]
  assert not keys[0] & keys[1] and keys[0] | keys[1] == set(range(103))


def test_bucketed_processes_slice_one_global_batch(corpus):
  single = data.BucketedBatches(corpus, batch_size=8, seed=5)
  hosts = [data.BucketedBatches(corpus, batch_size=8, seed=5, process_index=i, process_count=2)
           for i in range(2)]
  for _, b, h0, h1 in zip(range(13), single, *hosts):
    for k in b:
      np.testing.assert_array_equal(b[k], np.concatenate([h0[k], h1[k]]))
  with pytest.raises(ValueError, match="multiple"):
    data.BucketedBatches(corpus, batch_size=9, process_count=2)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors that name the file.

def test_other_tokenizer_or_length_names_both_fingerprints(corpus, tok, tmp_path):
  other = tokenizer.load(write_tiny_vocab(tmp_path))
  with pytest.raises(data.PreparedError, match=r"manifest.json: prepared with wordpiece "
                     r"tokenizer, vocab 30522 #\w+, max_length 64, but this run uses wordpiece "
                     r"tokenizer, vocab \d+ #\w+, max_length 64"):
    data.open_prepared(corpus.path, tokenizer=other, max_length=64)
  with pytest.raises(data.PreparedError, match="max_length 64, but .* max_length 128"):
    data.open_prepared(corpus.path, tokenizer=tok, max_length=128)


def test_truncated_or_corrupt_shard_is_named(tmp_path, gt_model_dir):
  (tmp_path / "c.txt").write_text("\n".join(lines(200)) + "\n")
  p = prepare(tmp_path, gt_model_dir, data.Source("text", paths=(str(tmp_path / "c.txt"),)),
              split_bytes=4000)
  shard = p.shards[1]
  raw = shard.read_bytes()
  shard.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.PreparedError, match=f"{shard}: truncated"):
    data.open_prepared(p.path)
  # Same size, bytes flipped inside the records (riegeli pads a file to 64 KiB blocks, so not
  # at a fraction of its size): the chunk hashes catch it on read.
  bad = bytearray(raw)
  for i in range(100, 164):
    bad[i] ^= 0xFF
  shard.write_bytes(bytes(bad))
  opened = data.open_prepared(p.path)
  batches = data.BucketedBatches(opened, batch_size=8, shuffle=False)
  with pytest.raises(data.PreparedError, match=f"{shard}: corrupt"):
    for _ in batches.iter_epoch():
      pass


def test_missing_or_failed_manifest(tmp_path, gt_model_dir):
  with pytest.raises(data.PreparedError, match="manifest.json: no manifest"):
    data.open_prepared(tmp_path)
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
  with pytest.raises(data.PreparedError, match=r"bad.jsonl, line 2: malformed JSON"):
    prepare(tmp_path, gt_model_dir, data.Source("jsonl", paths=(str(tmp_path / "bad.jsonl"),)))
  assert not (tmp_path / "prep" / "manifest.json").exists()
  with pytest.raises(data.PreparedError, match=r"prepare.failed.json: the preparation .* failed "
                     r"\(.*bad.jsonl, line 2"):
    data.open_prepared(tmp_path / "prep")
  # A preparation killed before its manifest: shards without a manifest are not a corpus.
  (tmp_path / "killed").mkdir()
  (tmp_path / "killed" / "shard-00000-of-00001.array_record").write_bytes(b"x")
  with pytest.raises(data.PreparedError, match="not a completed preparation"):
    data.open_prepared(tmp_path / "killed")


def test_empty_source_and_unknown_label(tmp_path, gt_model_dir):
  (tmp_path / "empty.txt").write_text("\n   \n")
  with pytest.raises(data.PreparedError, match="empty.txt: empty source"):
    prepare(tmp_path, gt_model_dir, data.Source("text", paths=(str(tmp_path / "empty.txt"),)))
  (tmp_path / "dev.csv").write_text("text,label\ngood,pos\nodd,meh\n")
  with pytest.raises(data.PreparedError, match=r"dev.csv, line 3: unknown label 'meh'"):
    prepare(tmp_path, gt_model_dir, data.Source(
        "csv", paths=(str(tmp_path / "dev.csv"),), label_column="label",
        label_names=("neg", "pos")), "dev")


def test_existing_preparation_is_not_overwritten(corpus, gt_model_dir):
  with pytest.raises(FileExistsError, match="already prepared"):
    data.prepare_corpus(data.Source("text", paths=("x",)), corpus.path,
                        tokenizer_path=gt_model_dir, max_length=64)
  assert data.open_prepared(corpus.path).num_examples == 103


@pytest.mark.slow
def test_multiprocess_direct_runner_equals_in_process(tmp_path, gt_model_dir, corpus, caplog):
  """The default runner (Beam's local FnApiRunner, one process a core) writes the same shards,
  and never tries the Prism runner (a binary downloaded from GitHub at run time)."""
  (tmp_path / "c.txt").write_text("\n".join(lines(103)) + "\n")
  caplog.set_level("INFO")
  p = prepare(tmp_path, gt_model_dir, data.Source("text", paths=(str(tmp_path / "c.txt"),)),
              split_bytes=2000, beam_args=data.default_beam_args(2))
  assert "prism" not in caplog.text.lower()
  assert [s["bytes"] for s in p.manifest["shards"]] == [
      s["bytes"] for s in corpus.manifest["shards"]]
  for a, b in zip(p.shards, corpus.shards, strict=True):
    assert a.read_bytes() == b.read_bytes()
  assert [os.path.basename(f) for f in p.shards] == [os.path.basename(f) for f in corpus.shards]


def test_key_ranges_hold_out_the_first_records(corpus):
  """distill's held-out set: records [0, 16) for evaluation, the rest for training."""
  ev = data.BucketedBatches(corpus, batch_size=8, shuffle=False, keys=(0, 16))
  assert sorted(np.concatenate([b["index"][b["weights"] > 0] for b in ev.iter_epoch()])
                ) == list(range(16))
  train = data.PackedBatches(corpus, batch_size=4, seq_len=64, keys=(16, 103))
  ids = np.concatenate([b["example_index"].ravel() for _, b in zip(range(30), train)])
  assert ids[ids >= 0].min() >= 16 and len(set(ids[ids >= 0].tolist())) == 87
  with pytest.raises(ValueError, match="outside"):
    data.BucketedBatches(corpus, batch_size=8, keys=(0, 104))
