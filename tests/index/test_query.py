"""parse_query: weights, + and -, quotes, image paths, and clear errors for malformed queries."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duomo.errors import InputError
from duomo.index import QueryError, QueryTerm, parse_query


def text(value: str, weight: float = 1.0) -> QueryTerm:
    return QueryTerm(weight, "text", value)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("golden retriever", [text("golden retriever")]),
        ("  dog  ", [text("dog")]),
        ("dog + cat", [text("dog"), text("cat")]),
        ("dog - grass", [text("dog"), text("grass", -1.0)]),
        ("dog -grass +ball", [text("dog"), text("grass", -1.0), text("ball")]),
        ("- dog", [text("dog", -1.0)]),
        ("+dog", [text("dog")]),
        ("t-shirt + rock-n-roll", [text("t-shirt"), text("rock-n-roll")]),
        ("c++ code", [text("c++ code")]),
        ("2:golden retriever", [text("golden retriever", 2.0)]),
        ('"2:golden retriever" - 0.5:fruit', [text("golden retriever", 2.0), text("fruit", -0.5)]),
        ("2 : dog + .25:cat", [text("dog", 2.0), text("cat", 0.25)]),
        ("\"a - b\" + 'c + d'", [text("a - b"), text("c + d")]),
        ('1:"2:30 pm"', [text("2:30 pm")]),
        ("3.:sky", [text("sky", 3.0)]),
        ("day:night", [text("day:night")]),
    ],
)
def test_parses_text_terms(query: str, expected: list[QueryTerm]) -> None:
    assert parse_query(query) == expected


def test_existing_files_are_image_terms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pool.jpg").write_bytes(b"x")
    (tmp_path / "my photo.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    terms = parse_query('"2:golden retriever" + ./pool.jpg - fruit + 0.5:"my photo.png"')
    assert terms == [
        text("golden retriever", 2.0),
        QueryTerm(1.0, "image", str(tmp_path / "pool.jpg")),
        text("fruit", -1.0),
        QueryTerm(0.5, "image", str(tmp_path / "my photo.png")),
    ]
    assert parse_query("pool.jpg")[0].kind == "image"  # no ./ needed for an existing file
    (tmp_path / "photos").mkdir()
    assert parse_query("photos") == [text("photos")]  # a folder is not an image


def test_custom_image_lookup(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    assert parse_query(str(tmp_path / "a.png"), image_lookup=None)[0].kind == "text"
    assert parse_query("beach", image_lookup=lambda t: Path("/x.png") if t == "beach" else None) == [
        QueryTerm(1.0, "image", "/x.png")
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("dog +", "ends with an operator"),
        ("-", "ends with an operator"),
        ("dog + + cat", "two operators in a row"),
        ("dog + - cat", "two operators in a row"),
        ('"golden retriever', "unterminated"),
        ("dog + 'cat", "unterminated"),
        ('""', "nothing to search for"),
        ("dog + 2:", "nothing to search for"),
        ("0:dog", "weight 0"),
        ("./missing/pool.jpg", "does not exist"),
        ("holiday.jpg + sea", "does not exist"),
    ],
)
def test_malformed_queries_raise_clear_errors(query: str, message: str) -> None:
    with pytest.raises(QueryError, match=message) as info:
        parse_query(query)
    assert isinstance(info.value, InputError)  # the CLI prints one line, the server answers 400


def test_non_string_query() -> None:
    with pytest.raises(QueryError):
        parse_query(None)  # type: ignore[arg-type]


words = st.text(alphabet="abcdefghij ", min_size=1, max_size=12).filter(lambda s: s.strip())
terms = st.lists(
    st.tuples(st.sampled_from([1, -1]), st.sampled_from([None, 0.5, 2.0, 3.25]), words),
    min_size=1,
    max_size=5,
)


@given(terms)
def test_rendered_queries_parse_back(spec: list[tuple[int, float | None, str]]) -> None:
    parts = []
    for i, (sign, weight, word) in enumerate(spec):
        op = ("+ " if sign > 0 else "- ") if i or sign < 0 else ""
        parts.append(op + (f'{weight}:"{word}"' if weight is not None else f'"{word}"'))
    parsed = parse_query(" ".join(parts), image_lookup=None)
    assert parsed == [QueryTerm(sign * (weight or 1.0), "text", word.strip()) for sign, weight, word in spec]
