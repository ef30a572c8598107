"""Log lines carry no terminal escape codes (issue 31): uvicorn's ``color_message`` and any ANSI sequence in a
message or a field are dropped, in both formats."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from service.logs import JsonFormatter, TextFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, message, (), None)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_no_escape_codes_in_any_line(formatter: logging.Formatter) -> None:
    rec = record("Uvicorn running on \x1b[1mhttp://0.0.0.0:8000\x1b[0m", color_message="\x1b[36m%d\x1b[0m",
                 peer="\x1b[31mred\x1b[0m\x1b]0;title\x07")  # fmt: skip
    line = formatter.format(rec)
    assert "\x1b" not in line and "color_message" not in line
    assert "http://0.0.0.0:8000" in line and "red" in line and "title" not in line
    if isinstance(formatter, JsonFormatter):
        assert json.loads(line)["message"] == "Uvicorn running on http://0.0.0.0:8000"


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_a_traceback_handed_over_as_text_is_cut_to_its_type(formatter: logging.Formatter) -> None:
    text = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nOSError: [Errno 98] Address in use\n'
    line = formatter.format(record(text))
    assert "traceback withheld: OSError" in line and "x.py" not in line and "\n" not in line


def test_text_lines_keep_their_time_and_scrubbed_exception() -> None:
    try:
        raise KeyError("DOE^JANE")
    except KeyError:
        rec = logging.LogRecord("service", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = TextFormatter().format(rec)
    assert line.split(" ")[2] == "ERROR" and "service: failed here" in line
    assert "KeyError at" in line and "DOE^JANE" not in line
