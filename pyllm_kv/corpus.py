"""Evaluation text: where it comes from and how it is cleaned.

The default corpus is Ambrose Bierce's *The Devil's Dictionary* (1911, public
domain), which Debian ships as the ``dict-devil`` package for the dictd
dictionary server.  The project never writes or vendors the text itself; the
test setup installs it with::

    apt-get install -y dict-devil

The package stores the book as ``/usr/share/dictd/devil.dict.dz`` (dictzip,
which is gzip-compatible) together with a dictd index.  :func:`load_text`
decompresses it, drops the dictd metadata entries and the e-text edition's
title block, and returns the book from its preface to the last entry
(about 380 kB, ~95k SmolLM2 tokens: ~185 chunks of 512 tokens, ~46 of 2048).

Any other UTF-8 text file can be used instead (``--text FILE``); if it carries
a Project Gutenberg header/footer, :func:`read_text_file` strips it.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

from .errors import PyllmKvError

__all__ = [
    "CorpusNotFoundError",
    "DEFAULT_CORPUS",
    "INSTALL_HINT",
    "corpus_path",
    "load_text",
    "read_text_file",
    "strip_gutenberg",
    "describe",
]

DEFAULT_CORPUS = "devil"

#: Debian package that provides the default corpus, and how to install it.
DEBIAN_PACKAGE = "dict-devil"
INSTALL_HINT = "apt-get install -y dict-devil"

_DICT_FILE = "devil.dict.dz"
_DICT_DIRS = (
    "/usr/share/dictd",
    "/usr/local/share/dictd",
)
#: Environment variable naming a directory (or the file itself) holding devil.dict.dz.
ENV_VAR = "PYLLM_KV_CORPUS"


class CorpusNotFoundError(PyllmKvError, FileNotFoundError):
    """The default evaluation corpus is not installed (or a given text file does not exist)."""


def describe() -> dict:
    """Provenance of the default corpus (for JSON reports and docs)."""
    return {
        "name": DEFAULT_CORPUS,
        "title": "The Devil's Dictionary",
        "author": "Ambrose Bierce",
        "year": 1911,
        "licence": "public domain (copyright expired)",
        "package": f"Debian {DEBIAN_PACKAGE}",
        "install": INSTALL_HINT,
    }


def corpus_path() -> Path:
    """Path of the installed ``devil.dict.dz``; raises :class:`CorpusNotFoundError`."""
    candidates: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        candidates.append(p if p.name.endswith((".dz", ".gz", ".dict")) else p / _DICT_FILE)
    candidates += [Path(d) / _DICT_FILE for d in _DICT_DIRS]
    for c in candidates:
        if c.is_file():
            return c
    raise CorpusNotFoundError(
        "The default evaluation corpus (Ambrose Bierce, 'The Devil's Dictionary', public domain) "
        f"is not installed: looked for {', '.join(str(c) for c in candidates)}.\n"
        f"Install it with:  {INSTALL_HINT}\n"
        "or pass your own UTF-8 text file with --text FILE (text=... in the Python API)."
    )


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer (licence boilerplate) if present."""
    m = _GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text)
    if m:
        text = text[: m.start()]
    return text.strip("\n")


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
    return text.strip("\n") + "\n"


def _clean_devil(raw: str) -> str:
    # The dictd file opens with metadata entries ("00-database-..."): the source
    # URL, a short name and an info entry holding the e-text's title block and
    # the author's preface.  Keep the book from its preface on.
    m = re.search(r"^\s*PREFACE\s*$", raw, re.M)
    if not m:
        raise ValueError("unexpected devil.dict.dz layout: no PREFACE heading")
    body = "PREFACE" + raw[m.end():]
    # The last metadata entry (00-database-alphabet) is a single line listing
    # the letters used by the index; it follows the last definition.
    body = re.sub(r"\n\s*[a-z]{20,}\s*$", "\n", body.rstrip() + "\n")
    return _normalise(body)


def load_text(name: str = DEFAULT_CORPUS) -> str:
    """Return the cleaned text of a known corpus (only ``"devil"`` so far)."""
    if name != DEFAULT_CORPUS:
        raise ValueError(f"unknown corpus {name!r}; known: {DEFAULT_CORPUS!r} (or pass a file path)")
    path = corpus_path()
    with gzip.open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    return _clean_devil(raw)


def read_text_file(path: str | os.PathLike) -> str:
    """Read a user-supplied UTF-8 text file (Gutenberg boilerplate stripped)."""
    p = Path(path)
    if not p.is_file():
        raise CorpusNotFoundError(f"text file not found: {p}; pass an existing UTF-8 text file, "
                                  "or leave --text out to use the default corpus")
    data = p.read_bytes()
    if p.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    text = data.decode("utf-8-sig", errors="replace")
    return _normalise(strip_gutenberg(text))
