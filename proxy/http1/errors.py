"""What llhttp's parse errors say, in the words Faultline passes on (both HTTP/1.1 sides and
the admin port parse with httptools)."""

from __future__ import annotations


def parser_error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("HPE_")
