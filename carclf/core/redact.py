"""Credentials out of everything carclf prints, logs or records: passwords in URIs and secret query parameters.

    redact("postgresql://mlflow:s3cret@db:5432/mlflow")        # 'postgresql://mlflow:***@db:5432/mlflow'
    redact("https://bucket.example/x?X-Amz-Signature=abc&v=1")  # '...?X-Amz-Signature=***&v=1'
    redact(f"cannot reach {uri}: refused")                      # every URI inside a message

The user name stays (it says which account is meant); the password and any query parameter
whose name says password, token, secret, signature, credential or key become `***`.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# A URI inside any text: scheme://, then everything up to whitespace, a quote or an angle bracket.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# user:password@ right after the scheme. The password may hold '/' (SQLAlchemy reads it up to the '@'),
# but 'host:5000/path@x' is a port and a path, not a password.
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*):(?!\d+(?:[/?#]|$))[^@\s]*@")
_SECRET_NAME = re.compile(r"pass|pwd|token|secret|sig|credential|api_?key|access_?key|private_?key", re.I)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#]+)=(?P<value>[^&;#]*)")


def _redact_uri(match: re.Match) -> str:
    uri = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", match.group(0), count=1)
    base, q, rest = uri.partition("?")
    if not q:
        return uri

    def param(m: re.Match) -> str:
        value = MASK if _SECRET_NAME.search(m["name"]) and m["value"] else m["value"]
        return f"{m['sep']}{m['name']}={value}"

    return base + _QUERY_PARAM.sub(param, q + rest)


def redact(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with every credential replaced by `***`."""
    return _URI.sub(_redact_uri, str(text))


def strip_credentials(uri: str) -> str:
    """`uri` without its `user:password@` part: for probes that need no login (an MLflow server's /health).

    urllib would otherwise take `user:password@host` for a host name, and fail to resolve it.
    """
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else uri


class RedactingFormatter(logging.Formatter):
    """Formats log records with every credential redacted: carclf's lines and its libraries' alike."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
