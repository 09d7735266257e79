"""Keep values this process received from the agent out of its logs.

Every value a `kvbroker` client receives is registered here (`register`) before the caller
sees it. `install()` puts a `logging.Filter` on the root logger and on each of its handlers,
and wraps the log record factory so records from any logger, and handlers added later, are
covered too. The filter replaces each registered value with `***` in the record's message,
its args and its exception text, in the forms that leak in practice: as is, Python-repr and
JSON escaped, UTF-8 bytes repr, base64 (standard and URL-safe, with and without padding) and
URL-encoded. It matches exact values only, so nothing else in a line changes.

`KVBROKER_REDACT=1` in the environment makes `import kvbroker` call `install()`.

This module never logs, and keeps its copies of the values (and their encodings) for the
life of the process: Python strings cannot be wiped (docs/python.md).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from typing import Any, Callable, List, Optional, Pattern, Set, Union
from urllib.parse import quote, quote_plus

__all__ = ["install", "uninstall", "register", "redact", "RedactingFilter", "MASK"]

MASK = "***"
# Encoded forms shorter than this are skipped: a 1-byte value's base64 ("YQ") would otherwise
# mask unrelated text. The value itself is always matched, whatever its length.
_MIN_DERIVED = 4

_lock = threading.Lock()
_forms: Set[str] = set()
_pattern: Optional[Pattern[str]] = None


def register(value: Union[str, bytes, bytearray]) -> None:
    """Redact `value` (and its encodings) from now on. Clients call this for every value."""
    global _pattern
    forms = _forms_of(value)
    with _lock:
        if forms <= _forms:
            return
        _forms.update(forms)
        ordered = sorted(_forms, key=len, reverse=True)  # longest first: the regex tries in order
        _pattern = re.compile("|".join(re.escape(f) for f in ordered))


def redact(text: str) -> str:
    """`text` with every registered value, in any of its forms, replaced by `***`."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record in place; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_FILTER = RedactingFilter("kvbroker.redact")


def install() -> RedactingFilter:
    """Puts the filter on the root logger, its current handlers and the record factory.

    Idempotent; call it again after adding handlers to the root logger if you like, though
    the record factory already covers records made after this call.
    """
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    current = logging.getLogRecordFactory()
    if not getattr(current, "_kvbroker_redacting", False):
        logging.setLogRecordFactory(_wrap_factory(current))
    return _FILTER


def uninstall() -> None:
    """Removes what `install()` added (the registered values stay registered)."""
    root = logging.getLogger()
    root.removeFilter(_FILTER)
    for handler in root.handlers:
        handler.removeFilter(_FILTER)
    current = logging.getLogRecordFactory()
    inner = getattr(current, "_kvbroker_inner", None)
    if inner is not None:
        logging.setLogRecordFactory(inner)


# === private ===

def _wrap_factory(inner: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = inner(*args, **kwargs)
        _redact_record(record)
        return record

    factory._kvbroker_redacting = True  # type: ignore[attr-defined]
    factory._kvbroker_inner = inner  # type: ignore[attr-defined]
    return factory


def _redact_record(record: logging.LogRecord) -> None:
    if _pattern is None:
        return
    # Message and args: format them together, as a handler would, and keep the args only when
    # nothing had to be masked (a dict or object in args may print the value).
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: mask the pieces instead
        record.msg = redact(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(redact(repr(a)) if not isinstance(a, str) else redact(a) for a in record.args)
        elif record.args:
            record.args = (redact(repr(record.args)),)
        message = None
    if message is not None:
        masked = redact(message)
        if masked != message:
            record.msg = masked
            record.args = None
    if getattr(record, "message", None):
        record.message = redact(record.message)
    # Exception text: format it once, here, so every standard formatter prints our copy.
    if record.exc_info and record.exc_info[0] is not None:
        text = record.exc_text or logging.Formatter().formatException(record.exc_info)
        masked = redact(text)
        if masked != text:
            record.exc_text = masked
            record.exc_info = None  # formatters print exc_text; nothing can re-render the original
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _forms_of(value: Union[str, bytes, bytearray]) -> Set[str]:
    forms: Set[str] = set()
    if isinstance(value, str):
        text: Optional[str] = value
        raw = value.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(value)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    if not raw:
        return forms
    derived: List[str] = []
    if text is not None:
        forms.add(text)
        derived += [
            repr(text)[1:-1],
            json.dumps(text)[1:-1],
            json.dumps(text, ensure_ascii=False)[1:-1],
            quote(text, safe=""),
            quote(text),
            quote_plus(text, safe=""),
        ]
    derived.append(repr(raw)[2:-1])
    for b64 in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        s = b64.decode("ascii")
        derived += [s, s.rstrip("=")]
    forms.update(f for f in derived if len(f) >= _MIN_DERIVED)
    return forms
