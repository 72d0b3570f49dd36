"""The producer package on its own: stream ordering and its imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from producer.streams import _Cursor


def test_cursor_orders_dedups_and_stops_at_end() -> None:
    cursor = _Cursor(after_seq=-1)
    msgs = [{"seq": i, "type": "token", "text": str(i)} for i in range(4)] + [{"seq": 4, "type": "end"}]
    assert cursor.offer(msgs[1]) == []  # a gap: held back
    assert cursor.offer(msgs[0]) == msgs[:2]
    assert cursor.offer(msgs[0]) == []  # duplicate
    assert cursor.offer(msgs[2]) + cursor.offer(msgs[3]) + cursor.offer(msgs[4]) == msgs[2:]
    assert cursor.done


def test_cursor_resuming_after_the_end_is_done_at_once() -> None:
    cursor = _Cursor(after_seq=4)
    assert cursor.offer({"seq": 3, "type": "token", "text": "x"}) == []
    assert not cursor.done
    assert cursor.offer({"seq": 4, "type": "end"}) == [] and cursor.done


def test_the_producer_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, producer, producer.streams, producer.client; "
        "heavy = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
