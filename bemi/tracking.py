"""What bemi tracks: schemas, ignored tables, ignored and masked columns (no Django needed).

One module turns the settings (Django's ``BEMI_*`` or ``bemi-worker``'s flags
and environment variables) into a :class:`Tracking`, validates them, and
translates their shell-style patterns into the regular expressions that the
database's ``_bemi_is_tracked(regclass)`` (``bemi/sql/tracking.sql``) and the
worker both use. Those regular expressions use only the syntax that Python's
``re`` and PostgreSQL's ARE read alike (``.*``, ``.``, ``[...]``, ``[^...]``,
backslash escapes), so the rule is one rule, written once.

Patterns: ``table`` or ``schema.table``; for columns ``table.column`` or
``schema.table.column``. A name without a schema means schema ``public``.
``*``, ``?`` and ``[...]`` (``[!...]`` negates) match as in :mod:`fnmatch`,
case-sensitively, like PostgreSQL names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from bemi.exactjson import ExactJSONEncoder

__all__ = [
    "BUILTIN_CREDENTIALS", "BUILTIN_IGNORED_TABLES", "BUILTIN_MASKED_COLUMNS", "MASK_PREFIX", "SETTING_NAMES", "Pattern",
    "Tracking", "TrackingError", "derive_key", "mask_text", "mask_json_value", "parse_list",
]

#: Tables whose rows are credentials: never tracked unless opted out by name.
#: ``django_session``: its primary key *is* the session key, a bearer credential.
BUILTIN_IGNORED_TABLES: tuple[str, ...] = ("django_session",)
#: Columns whose values are credentials, with why; never stored. ``auth_user.password``: the password
#: hash, copied into before/after by every login's ``last_login`` update. The others are the
#: tokens, keys and secrets of popular Django packages, under their default table names
#: (docs/tracking.md lists them). (The Django side adds the ``password`` column of a custom
#: ``AUTH_USER_MODEL``.)
BUILTIN_CREDENTIALS: dict[str, str] = {
    "auth_user.password": "every login copies the password hash into before and after",
    "authtoken_token.key": "Django REST framework's token: a bearer credential, also the primary key",
    "knox_authtoken.digest": "django-rest-knox's token digest (the primary key)",
    "knox_authtoken.token_key": "django-rest-knox's token prefix, part of the bearer credential",
    "oauth2_provider_accesstoken.token": "django-oauth-toolkit's access token, a bearer credential",
    "oauth2_provider_refreshtoken.token": "django-oauth-toolkit's refresh token",
    "oauth2_provider_grant.code": "django-oauth-toolkit's authorization code",
    "oauth2_provider_application.client_secret": "django-oauth-toolkit's client secret",
    "oauth2_provider_device.device_code": "django-oauth-toolkit's device code",
    "oauth2_provider_device.user_code": "django-oauth-toolkit's device user code",
    "token_blacklist_outstandingtoken.token": "djangorestframework-simplejwt's refresh token",
    "socialaccount_socialtoken.token": "django-allauth's OAuth token of a social account",
    "socialaccount_socialtoken.token_secret": "django-allauth's OAuth token secret or refresh token",
    "socialaccount_socialapp.secret": "django-allauth's OAuth client secret",
    "account_emailconfirmation.key": "django-allauth's e-mail confirmation key",
    "mfa_authenticator.data": "django-allauth's TOTP secret and recovery codes seed",
    "otp_totp_totpdevice.key": "django-otp's TOTP secret",
    "otp_hotp_hotpdevice.key": "django-otp's HOTP secret",
    "otp_static_statictoken.token": "django-otp's backup (static) token",
    "otp_email_emaildevice.token": "django-otp's e-mailed token",
    "two_factor_phonedevice.key": "django-two-factor-auth's phone OTP secret",
}
BUILTIN_MASKED_COLUMNS: tuple[str, ...] = tuple(BUILTIN_CREDENTIALS)

#: The marker that replaces a masked value: ``bemi-masked:`` + a digest keyed per column.
MASK_PREFIX = "bemi-masked:"
_DIGEST_HEX = 32  # 128 bits: equal values of one column give equal markers, a change a different one
#: Markers of versions before per-column keys: 24 hex digits, one key for every column.
LEGACY_MARKER = re.compile(r"bemi-masked:[0-9a-f]{24}\Z")
MARKER = re.compile(r"bemi-masked:[0-9a-f]{32}\Z")

SETTING_NAMES = {
    "schemas": "BEMI_SCHEMAS",
    "ignored_tables": "BEMI_IGNORED_TABLES",
    "ignored_columns": "BEMI_IGNORED_COLUMNS",
    "masked_columns": "BEMI_MASKED_COLUMNS",
    "unsafe_track_builtins": "BEMI_UNSAFE_TRACK_BUILTINS",
    "skip_unchanged_updates": "BEMI_SKIP_UNCHANGED_UPDATES",
    "masking_key": "BEMI_MASKING_KEY",
}


class TrackingError(ValueError):
    """A setting that cannot be used; the message names the setting."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


# -- patterns -------------------------------------------------------------------------------

_SPECIAL = set(".^$*+?()[]{}|\\")


def glob_to_regex(glob: str) -> str:
    """A shell-style pattern -> an anchored regex read alike by Python ``re`` and PostgreSQL ``~``.

    Raises ValueError on an unclosed or empty ``[...]``.
    """
    out = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            j = glob.find("]", j)
            if j < 0:
                raise ValueError(f"unclosed '[' in {glob!r}")
            body = glob[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            if not body:
                raise ValueError(f"empty '[]' in {glob!r}")
            body = body.replace("\\", "\\\\").replace("[", "\\[")
            if body.startswith("]"):
                body = "\\]" + body[1:]
            if body.startswith("^"):
                body = "\\^" + body[1:]
            out.append("[" + ("^" if negate else "") + body + "]")
        elif c in _SPECIAL:
            out.append("\\" + c)
        else:
            out.append(c)
    return "^(?:" + "".join(out) + ")$"


def _split(text: str) -> list[str]:
    """Split a pattern on the dots that are not inside ``[...]``."""
    parts: list[str] = []
    current: list[str] = []
    depth = False
    for c in text:
        if c == "[" and not depth:
            depth = True
        elif c == "]" and depth:
            depth = False
        if c == "." and not depth:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class Pattern:
    """One entry of a setting: its text and one anchored regex per part."""

    text: str
    schema: str  # regex
    table: str  # regex
    column: str | None = None  # regex, for column patterns
    _compiled: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, text: Any, setting: str, columns: bool) -> "Pattern":
        what = "'table.column' or 'schema.table.column'" if columns else "'table' or 'schema.table'"
        if not isinstance(text, str) or not text.strip() or text != text.strip():
            raise TrackingError(setting, f"{text!r} is not a pattern: expected {what}")
        parts = _split(text)
        if len(parts) not in ((2, 3) if columns else (1, 2)) or not all(parts):
            raise TrackingError(setting, f"{text!r} is not a pattern: expected {what}")
        if len(parts) == (2 if columns else 1):
            parts.insert(0, "public")
        try:
            regexes = [glob_to_regex(p) for p in parts]
            compiled = tuple(re.compile(r, re.DOTALL) for r in regexes)
        except (ValueError, re.error) as exc:
            raise TrackingError(setting, f"{text!r} is not a pattern: {exc}") from None
        return cls(text, regexes[0], regexes[1], regexes[2] if columns else None, compiled)

    def matches_table(self, schema: str, table: str) -> bool:
        return bool(self._compiled[0].match(schema) and self._compiled[1].match(table))

    def matches_column(self, column: str) -> bool:
        return len(self._compiled) == 3 and bool(self._compiled[2].match(column))

    @property
    def is_literal(self) -> bool:
        """No wildcard: names one table (or column)."""
        return not any(c in self.text for c in "*?[")

    @property
    def names(self) -> tuple[str, ...]:
        """``(schema, table[, column])`` of a literal pattern."""
        parts = _split(self.text)
        return tuple(["public"] + parts if len(parts) == (1 if self.column is None else 2) else parts)


def parse_list(value: Any, setting: str) -> list[str]:
    """A setting that must be a list (or tuple) of strings; None means empty."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TrackingError(setting, f"must be a list of strings, not {type(value).__name__} {value!r}")
    return list(value)


def split_env(value: str | None) -> list[str] | None:
    """``a, b,c`` -> ``['a', 'b', 'c']`` (flags and environment variables); None stays None."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


# -- the settings as one object --------------------------------------------------------------

@dataclass(frozen=True)
class Tracking:
    """The validated tracking settings (built-ins included, opt-outs removed)."""

    schemas: tuple[Pattern, ...] = ()
    ignored_tables: tuple[Pattern, ...] = ()
    ignored_columns: tuple[Pattern, ...] = ()
    masked_columns: tuple[Pattern, ...] = ()
    unsafe_track_builtins: tuple[str, ...] = ()
    skip_unchanged_updates: bool = False
    #: what the user wrote (without built-ins): stored in the database for a worker started without flags
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls,
        schemas: Iterable[str] | None = None,
        ignored_tables: Iterable[str] | None = None,
        ignored_columns: Iterable[str] | None = None,
        masked_columns: Iterable[str] | None = None,
        unsafe_track_builtins: Iterable[str] | None = None,
        skip_unchanged_updates: Any = False,
        extra_masked_columns: Sequence[str] = (),
    ) -> "Tracking":
        """Validate the settings; raise TrackingError naming the first bad one."""
        names = SETTING_NAMES
        schema_list = parse_list(schemas, names["schemas"]) if schemas is not None else ["public"]
        schema_patterns = []
        for text in schema_list:
            if not isinstance(text, str) or not text or text != text.strip() or len(_split(text)) != 1:
                raise TrackingError(names["schemas"], f"{text!r} is not a schema name or pattern")
            try:
                regex = glob_to_regex(text)
                compiled = re.compile(regex, re.DOTALL)
            except (ValueError, re.error) as exc:
                raise TrackingError(names["schemas"], f"{text!r} is not a pattern: {exc}") from None
            schema_patterns.append(Pattern(text, regex, ".*", None, (compiled,)))
        opt_out = parse_list(unsafe_track_builtins, names["unsafe_track_builtins"])
        builtins = set(BUILTIN_IGNORED_TABLES) | set(BUILTIN_MASKED_COLUMNS) | set(extra_masked_columns)
        for name in opt_out:
            if name not in builtins:
                raise TrackingError(names["unsafe_track_builtins"],
                                    f"{name!r} is not a built-in; the built-ins are {sorted(builtins)}")
        if not isinstance(skip_unchanged_updates, bool):
            raise TrackingError(names["skip_unchanged_updates"],
                                f"must be True or False, not {skip_unchanged_updates!r}")
        user_tables = parse_list(ignored_tables, names["ignored_tables"])
        user_ignored = parse_list(ignored_columns, names["ignored_columns"])
        user_masked = parse_list(masked_columns, names["masked_columns"])
        tables = [Pattern.parse(t, names["ignored_tables"], columns=False) for t in user_tables]
        tables += [Pattern.parse(t, "built-in", columns=False) for t in BUILTIN_IGNORED_TABLES if t not in opt_out]
        ignored = [Pattern.parse(c, names["ignored_columns"], columns=True) for c in user_ignored]
        masked = [Pattern.parse(c, names["masked_columns"], columns=True) for c in user_masked]
        builtin_masked = list(dict.fromkeys([*BUILTIN_MASKED_COLUMNS, *extra_masked_columns]))
        masked += [Pattern.parse(c, "built-in", columns=True) for c in builtin_masked if c not in opt_out]
        return cls(
            schemas=tuple(schema_patterns),
            ignored_tables=tuple(tables),
            ignored_columns=tuple(ignored),
            masked_columns=tuple(masked),
            unsafe_track_builtins=tuple(opt_out),
            skip_unchanged_updates=skip_unchanged_updates,
            source={
                "schemas": schema_list, "ignored_tables": user_tables, "ignored_columns": user_ignored,
                "masked_columns": user_masked, "unsafe_track_builtins": opt_out,
                "skip_unchanged_updates": skip_unchanged_updates, "extra_masked_columns": list(extra_masked_columns),
            },
        )

    @classmethod
    def from_source(cls, source: Mapping[str, Any]) -> "Tracking":
        """The inverse of ``.source`` (what the database stores)."""
        return cls.build(**{k: source.get(k) for k in (
            "schemas", "ignored_tables", "ignored_columns", "masked_columns", "unsafe_track_builtins",
        )}, skip_unchanged_updates=bool(source.get("skip_unchanged_updates", False)),
            extra_masked_columns=tuple(source.get("extra_masked_columns") or ()))

    # -- decisions ---------------------------------------------------------------------------

    def tracks_schema(self, schema: str) -> bool:
        return any(p._compiled[0].match(schema) for p in self.schemas)

    def tracks(self, schema: str, table: str) -> bool:
        """Is this table tracked (by name; the database also excludes bemi's own tables by oid)?"""
        return self.tracks_schema(schema) and not any(p.matches_table(schema, table) for p in self.ignored_tables)

    def columns(self, schema: str, table: str, names: Sequence[str]) -> tuple[frozenset[int], frozenset[int]]:
        """Positions of the (masked, ignored) columns among ``names`` of one table."""
        masked = [p for p in self.masked_columns if p.matches_table(schema, table)]
        ignored = [p for p in self.ignored_columns if p.matches_table(schema, table)]
        return (
            frozenset(i for i, n in enumerate(names) if any(p.matches_column(n) for p in masked)),
            frozenset(i for i, n in enumerate(names) if any(p.matches_column(n) for p in ignored)),
        )

    def sql_rules(self) -> dict[str, Any]:
        """What ``_bemi_is_tracked`` reads: regexes of the schemas and of the ignored tables."""
        return {
            "schemas": [p.schema for p in self.schemas],
            "ignored_tables": [[p.schema, p.table] for p in self.ignored_tables],
        }

    def source_json(self) -> str:
        return json.dumps(dict(self.source), sort_keys=True)

    def describe(self) -> str:
        """One log line: what is tracked."""
        parts = [f"schemas {', '.join(p.text for p in self.schemas)}"]
        parts.append("ignored tables " + (", ".join(p.text for p in self.ignored_tables) or "none"))
        if self.ignored_columns:
            parts.append("ignored columns " + ", ".join(p.text for p in self.ignored_columns))
        parts.append("masked columns " + (", ".join(p.text for p in self.masked_columns) or "none"))
        if self.skip_unchanged_updates:
            parts.append("unchanged updates skipped")
        return "; ".join(parts)


# -- masking ----------------------------------------------------------------------------------

def derive_key(secret: str | bytes) -> bytes:
    """The master masking key derived from a secret (``BEMI_MASKING_KEY`` or ``SECRET_KEY``)."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hmac.new(secret, b"bemi-masked-columns", hashlib.sha256).digest()


def column_key(key: bytes, schema: str, table: str, column: str) -> bytes:
    """The key of one column's markers, from the master key: equal values in two columns give unrelated
    markers, so nobody who reads ``changes`` can tell that a token equals a password, a key a secret."""
    label = json.dumps(["bemi-column", schema, table, column]).encode("ascii")  # one name, one label
    return hmac.digest(key, label, "sha256")


def mask_text(key: bytes, value: bytes) -> str:
    """The marker of a value (its canonical bytes) under a column's key, as JSON text."""
    digest = hmac.digest(key, value, "sha256").hex()[:_DIGEST_HEX]  # one-shot: the fast C path
    return '"' + MASK_PREFIX + digest + '"'


def canonical(json_text: str) -> bytes:
    """What is digested: a string's own UTF-8, any other JSON value's text."""
    if json_text.startswith('"'):
        if "\\" not in json_text:  # no escape: the text between the quotes is the string
            return json_text[1:-1].encode("utf-8", "surrogatepass")
        return json.loads(json_text).encode("utf-8", "surrogatepass")
    return json_text.encode("utf-8")


def canonical_value(value: Any) -> bytes:
    """``canonical`` of a value read back from JSON (``bemi_redact``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      cls=ExactJSONEncoder).encode("utf-8")  # a numeric 1.20 as the worker stored it


def is_marker(value: Any) -> bool:
    """A marker of this version (per-column key)."""
    return isinstance(value, str) and MARKER.match(value) is not None


def mask_json_value(key: bytes, value: Any) -> Any:
    """Mask a value read back from ``changes`` under a column's key; markers and NULLs stay as they are.

    A marker of an earlier version (one key for every column) is re-keyed: see ``rekey_legacy``.
    """
    if value is None or is_marker(value):
        return value
    if isinstance(value, str) and LEGACY_MARKER.match(value):
        return rekey_legacy(key, value)
    return json.loads(mask_text(key, canonical_value(value)))


def legacy_marker(master_key: bytes, value: bytes) -> str:
    """The marker earlier versions wrote (the master key for every column, 96 bits): to recognise them."""
    return MASK_PREFIX + hmac.digest(master_key, value, "sha256").hex()[:24]


def rekey_legacy(key: bytes, marker: str) -> str:
    """A marker of an earlier version, digested again under the column's key.

    The value behind it is unknown, so it cannot become the value's new marker; digesting the old
    marker keeps what it told within its column (equal values, equal markers) and removes the
    equality across columns that one key for all columns gave.
    """
    return MASK_PREFIX + hmac.digest(key, b"bemi-masked-legacy:" + marker.encode("ascii"), "sha256").hex()[:_DIGEST_HEX]
