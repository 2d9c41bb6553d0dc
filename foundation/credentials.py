"""Credentials inside URLs (`https://user:token@host/repo`, `s3://KEY:SECRET@bucket`, `...?sig=...`).

Wherever a URL is written (a manifest, a log line, an artifact, a model card, the registry) it is written
redacted: `https://***@host/repo`. The real URL is never written down; the process that read it from the
config remembers it (`remember_url`) and hands it out only where it is used (`real_url`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

REDACTED = "***"

# The userinfo ends at the first "@": a secret may hold "/" (AWS secret keys do), so the authority's
# usual end cannot be trusted. A path with an "@" in it is then redacted too: safe, merely less readable.
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^@]*)@")
# Query parameters that carry a secret: sig (Azure SAS), X-Amz-Signature, token, access_key, password ...
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&][^=&#]*(?:sig|token|key|secret|pass|credential|auth)[^=&#]*=)(?P<value>[^&#]*)", re.IGNORECASE)
# In these schemes "container@account" names a place, not a user: only "container:secret@" is a credential.
_CONTAINER_SCHEMES = ("abfs://", "abfss://", "az://", "wasb://", "wasbs://")

_REAL_URLS: dict[str, str] = {}  # redacted -> real, for the URLs this process read from a config


def _userinfo(url: str) -> str | None:
    found = _USERINFO.match(url)
    if not found or not found["userinfo"]:
        return None
    if found["scheme"].lower() in _CONTAINER_SCHEMES and ":" not in found["userinfo"]:
        return None
    return found["userinfo"]


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL (its userinfo, the password in it, secret query values), longest first."""
    secrets = set()
    if userinfo := _userinfo(url):
        secrets.add(userinfo)
        _, _, password = userinfo.partition(":")
        secrets.update(s for s in (password, unquote(userinfo), unquote(password)) if len(s) >= 4)
    for param in _SECRET_PARAM.finditer(url):
        if param["value"]:
            secrets.update(s for s in (param["value"], unquote(param["value"])) if s)
    secrets.discard(REDACTED)
    return sorted(secrets, key=len, reverse=True)


def redact_url(url: str) -> str:
    """The URL with its credentials replaced by ***; a URL without any comes back unchanged."""
    if _userinfo(url) is not None:
        url = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", url, count=1)
    return _SECRET_PARAM.sub(lambda m: f"{m['name']}{REDACTED}" if m["value"] else m[0], url)


def is_redacted(url: str) -> bool:
    """Did the URL have credentials that were redacted (so that it cannot be used as it is)?"""
    return _userinfo(url) == REDACTED or any(p["value"] == REDACTED for p in _SECRET_PARAM.finditer(url))


def without_credentials(url: str) -> str:
    """The URL with no credentials at all (for a filesystem that reads them from its own configuration)."""
    if _userinfo(url) is not None:
        url = _USERINFO.sub(lambda m: m["scheme"], url, count=1)
    url = _SECRET_PARAM.sub(lambda m: m["name"][0], url)
    return re.sub(r"[?&]+(?=&|#|$)", "", url.replace("?&", "?"))


def scrub(text: str, url: str) -> str:
    """`text` (an error message, a log line) with every secret of `url` replaced by ***."""
    for secret in url_secrets(url):
        text = text.replace(secret, REDACTED)
    return text


def remember_url(url: str) -> None:
    """Keep a URL with credentials in this process's memory (only), under its redacted form."""
    if url_secrets(url):
        _REAL_URLS[redact_url(url)] = url


def real_url(recorded: str) -> str | None:
    """The usable URL for one as it was recorded: itself when nothing was redacted, else the real one this
    process read from a config, else None."""
    if not is_redacted(recorded):
        return recorded
    return _REAL_URLS.get(recorded)


def forget_urls() -> None:
    """Drop the remembered URLs (tests: a fresh process knows none)."""
    _REAL_URLS.clear()
