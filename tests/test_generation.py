"""Generation helpers shared by both backends (models/generation.py): stop strings and the
context check."""

from __future__ import annotations

import pytest

from models.generation import StopScanner, check_context


@pytest.mark.parametrize(
    "pieces,stops,text,stopped",
    [
        (["Hello", " wor", "ld"], None, "Hello world", False),
        (["Hello", " wor", "ld. Bye"], ["."], "Hello world", True),
        (["ab", "c<", "/s", ">tail"], ["</s>"], "abc", True),
        (["ab", "c<", "/x"], ["</s>"], "abc</x", False),
        (["x", "EN", "D"], ["END", "STOP"], "x", True),
        (["na", "ï", "ve"], ["ïv"], "na", True),
    ],
)
def test_stop_scanner(pieces: list[str], stops: list[str] | None, text: str, stopped: bool) -> None:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    assert out == text and scanner.stopped == stopped


def test_context_check_says_by_how_much() -> None:
    check_context(10, 20, 30)
    with pytest.raises(Exception, match="exceed the context window of 30 by 1"):
        check_context(10, 21, 30)
