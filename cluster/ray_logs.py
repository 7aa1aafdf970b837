"""Log records in which Ray questions something moeray does on purpose: silenced where moeray does it,
for that call only, each with its reason at the call site. Every other record goes through."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _DropContaining(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def expected_record_silenced(logger_name: str, fragment: str) -> Iterator[None]:
    """Drop the records of `logger_name` whose message contains `fragment` while the block runs."""
    logger, drop = logging.getLogger(logger_name), _DropContaining(fragment)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
