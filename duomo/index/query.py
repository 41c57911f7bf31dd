"""The search query language: weighted sums and differences of text and image terms in one string.

    golden retriever                      one text term
    ./pool.jpg                            an existing file is an image term
    "2:golden retriever" + ./pool.jpg - fruit
    dog -grass                            a + or - that starts a word is an operator; "t-shirt" is one word
    1:"2:30 pm"                           quotes group text (and protect + and -); the first N: is a weight

The query vector is the normalised weighted sum of the terms' (normalised) embeddings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duomo.index.errors import QueryError
from duomo.index.files import is_image_file

_WEIGHT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*:(.*)$", re.DOTALL)
_PATHLIKE_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")

ImageLookup = Callable[[str], Path | None]


@dataclass(frozen=True)
class QueryTerm:
    """One term of a query: a signed weight and a text or an image path."""

    weight: float
    kind: str  # "text" or "image"
    value: str


def find_image_file(text: str) -> Path | None:
    """Default lookup: an existing file is an image term; a missing path that looks like one is an error."""
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_path = text.startswith(_PATHLIKE_PREFIXES) or (
        is_image_file(text) and not any(c.isspace() for c in text)
    )
    if looks_like_path:
        raise QueryError(f"image query {text!r} does not exist; check the path")
    return None


def parse_query(query: str, image_lookup: ImageLookup | None = find_image_file) -> list[QueryTerm]:
    """Split a query into weighted text/image terms; `image_lookup(text)` decides which terms are images."""
    if not isinstance(query, str) or not query.strip():
        raise QueryError(
            "the search query is empty; give some text, an image path, or a combination like 'a + b'"
        )
    raw_terms = _split(query)
    terms = []
    for sign, raw in raw_terms:
        weight, text = _weight(raw, query)
        image = image_lookup(text) if image_lookup is not None else None
        if image is not None:
            terms.append(QueryTerm(sign * weight, "image", os.fspath(image)))
        else:
            terms.append(QueryTerm(sign * weight, "text", text))
    return terms


def compose_query(
    query: str,
    encode_text: Callable[[list[str]], Any],
    image_vector: Callable[[str], np.ndarray],
    image_lookup: ImageLookup | None = find_image_file,
) -> np.ndarray:
    """The normalised weighted sum of a query's terms: texts encoded in one call, images by `image_vector`."""
    terms = parse_query(query, image_lookup)
    texts = [t.value for t in terms if t.kind == "text"]
    text_vectors = iter(np.asarray(encode_text(texts), dtype=np.float32) if texts else [])
    total = sum(
        term.weight * (next(text_vectors) if term.kind == "text" else image_vector(term.value))
        for term in terms
    )
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError(f"the terms of query {query!r} cancel out; change a weight or drop a term")
    return (total / norm).astype(np.float32)


def _split(query: str) -> list[tuple[int, str]]:
    """(sign, raw term) pairs: + and - starting a word are operators, quotes group, whitespace is kept."""
    terms: list[tuple[int, str]] = []
    sign: int | None = None
    buf: list[str] = []
    content = False  # the current term has something besides whitespace (an empty "" counts)
    word_start = True
    i = 0
    while i < len(query):
        c = query[i]
        if c in "\"'":
            end = query.find(c, i + 1)
            if end < 0:
                raise QueryError(f"unterminated {c} quote in query {query!r}; close it or remove it")
            buf.append(query[i + 1 : end])
            content, word_start, i = True, False, end + 1
            continue
        if c in "+-" and word_start:
            if content:
                terms.append((sign or 1, "".join(buf)))
                buf, content = [], False
            elif sign is not None or terms:
                raise QueryError(f"two operators in a row in query {query!r}; put a term between them")
            sign, i = (1 if c == "+" else -1), i + 1
            continue
        buf.append(c)
        content = content or not c.isspace()
        word_start = c.isspace()
        i += 1
    if not content:
        raise QueryError(f"query {query!r} ends with an operator; add a term after it")
    terms.append((sign or 1, "".join(buf)))
    return terms


def _weight(raw: str, query: str) -> tuple[float, str]:
    """Split an optional `N:` weight prefix off a raw term; check what is left."""
    match = _WEIGHT.match(raw)
    weight, text = (float(match.group(1)), match.group(2)) if match else (1.0, raw)
    text = text.strip()
    if match and weight == 0:
        raise QueryError(f"term {raw.strip()!r} has weight 0; drop the term, or use - to subtract it")
    if not text:
        what = f"term {raw.strip()!r}" if raw.strip() else "an empty term"
        raise QueryError(f"{what} in query {query!r} has nothing to search for")
    return weight, text
