"""Keep credentials out of logs, errors, manifests and reprs.

A URL may carry ``user:password@`` or a signed query string, and
``storage_options`` carry keys, secrets and tokens. Rather than trusting every
code path to remember what not to print, each manager builds one
:class:`Redactor` from its URL and options and passes every outgoing message
(log records and exception texts) through :meth:`Redactor.scrub`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Option names whose values are secrets in s3fs, gcsfs, pydrive2 and friends.
_SECRET_KEY = re.compile(
    r"(secret|token|password|passwd|key|credential|auth|signature|session|private|client_json$)",
    re.IGNORECASE,
)
# Values shorter than this are not scrubbed from text: masking "1" or "us" would
# mangle messages without protecting anything.
_MIN_SECRET_LEN = 4


def redact_url(url: str) -> str:
    """Return ``url`` without userinfo or query string.

    >>> redact_url("s3://AKIA:shh@bucket/run?X-Amz-Signature=abc")
    's3://***@bucket/run'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url  # nothing to hide; keep the URL exactly as the user wrote it
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _secret_values(value: Any, key_is_secret: bool = False) -> Iterable[str]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _secret_values(v, key_is_secret or bool(_SECRET_KEY.search(str(k))))
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            yield from _secret_values(v, key_is_secret)
    elif isinstance(value, str) and key_is_secret and len(value) >= _MIN_SECRET_LEN:
        yield value


class Redactor:
    """Masks every secret a manager knows about in any text it emits."""

    def __init__(self, url: str = "", storage_options: Mapping[str, Any] | None = None):
        secrets = set(_secret_values(dict(storage_options or {})))
        try:
            parts = urlsplit(url)
            for piece in (parts.password, parts.username, parts.query):
                if piece and len(piece) >= _MIN_SECRET_LEN:
                    secrets.add(piece)
        except ValueError:
            pass
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(secrets, key=len, reverse=True)
        self.url = redact_url(url) if url else url

    def scrub(self, text: str) -> str:
        """Return ``text`` with every known secret replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def describe(self, exc: BaseException) -> str:
        """A one-line, credential-free description of an exception."""
        return self.scrub(f"{type(exc).__name__}: {exc}")
