"""Real (summary, description) pairs from the Debian manual pages installed on the machine.

Each page under /usr/share/man/man{1,2,3,5,7,8} (roff, gzipped) gives one pair: the one-line summary
of its NAME section ("list directory contents", the command's name dropped) and the first
paragraph of its DESCRIPTION section. A query is the summary; its document the description: a
retrieval task with one relevant document a query, written by thousands of package authors.
Pages without both parts, links to other pages (`.so`) and repeated summaries are skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path("/usr/share/man")
SECTIONS = ("1", "2", "3", "5", "7", "8")  # commands, calls, library, formats, overviews, admin
# Generated families of thousands of near-identical pages (the Google Cloud CLI's alpha / beta /
# GA variants of each command): they would leak across a held-out split, so they are left out.
GENERATED = ("gcloud", "bq", "gsutil")
INSTALL = "apt-get install manpages man-db (or any Debian packages that ship manual pages)"

_ESCAPES = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\[[^\]]*\]|\(..|.)|\\[&|^%:cdu]|"
                      r"\\s[-+]?\d|\\[kn]\(..|\\[kn].")
_CHARS = {r"\-": "-", r"\(em": "-", r"\(en": "-", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"',
          r"\(rq": '"', r"\(oq": "'", r"\(cq": "'", r"\(bu": "", r"\e": "\\", r"\ ": " ",
          r"\~": " ", r"\0": " ", r"\(co": "(c)", r"\(tm": "", r"\(rg": ""}
_TEXT_MACROS = {".B", ".I", ".BR", ".RB", ".IR", ".RI", ".BI", ".IB", ".SM", ".SB"}
_BREAKS = {".PP", ".P", ".LP", ".TP", ".IP", ".SS", ".SH", ".RS", ".RE", ".HP", ".TQ", ".nf"}


def _plain(line: str) -> str:
  for k, v in _CHARS.items():
    line = line.replace(k, v)
  line = _ESCAPES.sub("", line)
  return " ".join(line.replace('"', " ").split()) if line.startswith(".") else " ".join(
      line.split())


def _sections(text: str) -> dict[str, list[str]]:
  out, name = {}, None
  for line in text.splitlines():
    if line.startswith((".SH", ".sh")):
      name = line[3:].strip().strip('"').upper()
      out.setdefault(name, [])
    elif name is not None and not line.startswith(('.\\"', "'\\\"")):
      out[name].append(line)
  return out


def _first_paragraph(lines: Sequence[str]) -> str:
  words: list[str] = []
  for line in lines:
    macro = line.split(maxsplit=1)[0] if line.startswith(".") else None
    if macro in _BREAKS or not line.strip():
      if words:
        break
      continue
    if macro is not None and macro not in _TEXT_MACROS:
      continue
    text = _plain(line[len(macro):] if macro else line)
    words.extend(text.split())
  return " ".join(words)


def parse_page(text: str) -> tuple[str, str] | None:
  """(summary, description paragraph) of one page's roff source, or None."""
  parts = _sections(text)
  name = " ".join(_plain(x) for x in parts.get("NAME", []) if not x.startswith(".")
                  or x.split(maxsplit=1)[0] in _TEXT_MACROS)
  if " - " not in name:
    return None
  summary = name.split(" - ", 1)[1].strip()
  description = _first_paragraph(parts.get("DESCRIPTION", []))
  if len(summary.split()) < 2 or len(description.split()) < 8:
    return None
  return summary, " ".join(description.split()[:96])


def pages(root: Path = ROOT, sections: Sequence[str] = SECTIONS) -> list[Path]:
  return sorted(p for s in sections for p in (root / f"man{s}").glob("*.gz"))


def read_pairs(root: str | Path = ROOT, sections: Sequence[str] = SECTIONS) -> Iterator[dict]:
  """{"summary", "description", "page"} for every usable page, in file-name order."""
  files = pages(Path(root), sections)
  if not files:
    raise FileNotFoundError(f"{root}: no manual pages under man{{{','.join(sections)}}}; "
                            f"{INSTALL}")
  seen = set()
  for path in files:
    try:
      with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    except (OSError, EOFError):
      continue  # a broken page of some package: not ours to fix
    if text.lstrip().startswith(".so"):
      continue
    pair = parse_page(text)
    if pair is None or pair[0].lower() in seen:
      continue
    seen.add(pair[0].lower())
    yield {"summary": pair[0], "description": pair[1], "page": path.name}


def held_out(page: str, fraction: float) -> bool:
  """A stable split by page name (the same pages held out on every machine and run)."""
  digest = int(hashlib.sha256(page.encode()).hexdigest()[:8], 16)
  return digest < fraction * 2**32
