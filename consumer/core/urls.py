"""URLs in logs and output: secrets masked.

`mask_url` hides two kinds of secret and leaves the rest of the URL readable:

- the password of a `user:password@` part: everything from the first `:` of the user info to
  its end, the last `@` before the first `/` (as libpq reads it, so a raw `?` or `@` in a
  password is masked too; a raw `/` too, when an `@` follows before the query);
- the values of query parameters whose name says they are secret (`password`, `passwd`,
  `pwd`, `secret`, `token`, `sasl.password`, `ssl.key.password`, ...: see `is_secret_name`).

A string without `://` (a libpq `key=value` conninfo given where a URL was expected) has the
values of its secret keywords masked the same way. When in doubt, more is masked, never less.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"

# Any name containing one of these words, case-insensitive, is secret.
_SECRET_WORDS = re.compile(r"password|passwd|passphrase|secret|token|credential", re.IGNORECASE)
# And these names, compared lowercased, word by word ("pwd", "db.pwd") or whole.
_SECRET_PARTS = frozenset({"pwd", "pass", "apikey"})
_SECRET_NAMES = frozenset(
    {"api_key", "api-key", "ssl.key.pem", "sasl.jaas.config", "sasl.oauthbearer.config"}
)
# A query parameter: a name after `?`, `&`, `;` or `#`, and its value up to the next separator.
_PARAMETER = re.compile(r"(?<=[?&;#])([^=&;?#]*)=([^&;]*)")
# A libpq conninfo keyword: `name = value`, the value bare or in single quotes.
_KEYWORD = re.compile(r"(?<![^\s])([A-Za-z0-9_.\-]+)(\s*=\s*)('(?:\\.|[^'\\])*'?|\S*)")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter or setting called `name` holds a secret."""
    lowered = unquote_plus(name).strip().lower()
    if _SECRET_WORDS.search(lowered) or lowered in _SECRET_NAMES:
        return True
    return any(part in _SECRET_PARTS for part in re.split(r"[^a-z0-9]+", lowered))


def mask_url(url: str) -> str:
    """`url` with its password and secret query values replaced by `***`, safe to show."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return _mask_parameters(_mask_keywords(url))
    head = rest.split("/", 1)[0]
    at = head.rfind("@")
    if at < 0 and ":" in head:  # maybe a password with a raw "/": its "@" is further on
        at = rest.split("?", 1)[0].rfind("@")
    if at < 0:
        return f"{scheme}://{_mask_parameters(rest)}"
    userinfo, remainder = rest[:at], rest[at + 1 :]
    user, colon, _password = userinfo.partition(":")
    userinfo = f"{user}:{MASK}" if colon else _mask_parameters(userinfo)
    return f"{scheme}://{userinfo}@{_mask_parameters(remainder)}"


def _mask_parameters(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"{name}={MASK}" if is_secret_name(name) else match.group(0)

    return _PARAMETER.sub(mask, text)


def _mask_keywords(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        name, equals, _value = match.groups()
        return f"{name}{equals}{MASK}" if is_secret_name(name) else match.group(0)

    return _KEYWORD.sub(mask, text)
