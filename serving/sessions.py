"""Which session a request continues: the `session_id` field or the X-Session-Id header."""

from __future__ import annotations

import re

from .errors import APIError

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


def check_session_id(session_id: str, param: str) -> None:
    if not re.fullmatch(SESSION_ID_PATTERN, session_id):
        raise APIError(400, f"{param} must be 1-128 characters of [A-Za-z0-9._:-].", param=param)


def session_from(body_session: str | None, header_session: str | None) -> str | None:
    """The session a request names (the field and the header may not name two different ones)."""
    if header_session is not None:
        check_session_id(header_session, "X-Session-Id")
    if body_session and header_session and body_session != header_session:
        raise APIError(400, "session_id and the X-Session-Id header name different sessions.", param="session_id")
    return body_session or header_session
