"""What llhttp's parse errors say, in the words Faultline passes on (both HTTP/1.1 sides and
the admin port parse with httptools)."""

from __future__ import annotations


def parser_error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("HPE_")


def parse_error_detail(exc: BaseException, in_trailers: bool) -> str:
    """llhttp's words for a request parse error, unless they would mislead: a Content-Length
    among the trailer fields of a chunked body (`in_trailers`) is reported by llhttp as one
    beside Transfer-Encoding, as if it were in the head."""
    text = parser_error_text(exc)
    if in_trailers and "Content-Length" in text:
        return "Content-Length in the trailer section of a chunked body (RFC 9112 §7.1.2)"
    return text
