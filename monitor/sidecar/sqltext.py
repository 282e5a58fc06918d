"""Query text fit to show: literals masked, comments dropped, then truncated.

`pg_stat_activity.query` is the statement as the server received it. With server-side
parameters (psycopg 3, asyncpg) values travel separately and the text holds `$1`; with
client-side interpolation (psycopg2, literal SQL) the values are inside the text. The
sidecar must never show parameter values, so the text is read with PostgreSQL's own
scanner (`pglast`, which embeds the server's lexer): every string of every kind (`'…'`,
`E'…'`, `$tag$…$tag$`, `U&'…'`, `B'…'`, `X'…'`) and every number (`1_000`, `0x1F`,
`1.5e3`, with a unary sign) becomes `?`, comments go, identifiers, keywords, operators and
positional parameters (`$1`) stay, whitespace collapses. A regex cannot do this: escaped
quotes, dollar quotes, nested comments and the newer numeric forms all fooled one.

What the scanner cannot read (a statement cut at `track_activity_query_size`, an
unterminated quote or comment, a character it does not know) is shown up to the first
token it could not handle, then `?`: never the raw rest. Even this text is only fetched
with `--show-query-text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_LIMIT = 200

#: Token names (libpg_query's) of literals: each becomes `?`.
_LITERALS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_NUMBERS = frozenset({"ICONST", "FCONST"})
_COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})
#: Tokens shown as written (besides keywords and single characters `ASCII_nn`).
_SHOWN = frozenset(
    {
        "IDENT",
        "UIDENT",
        "PARAM",
        "Op",
        "TYPECAST",
        "DOT_DOT",
        "COLON_EQUALS",
        "EQUALS_GREATER",
        "LESS_EQUALS",
        "GREATER_EQUALS",
        "NOT_EQUALS",
    }
)
_SIGNS = frozenset({"ASCII_43", "ASCII_45"})  # + and -
#: After these a sign is binary (`a - 1`), elsewhere unary (`= -1`): folded into the `?`.
_VALUE_ENDS = frozenset({"IDENT", "UIDENT", "PARAM", "ASCII_41", "ASCII_93"}) | _LITERALS
#: How many times a failed scan is retried on the text before the failure.
_MAX_RESCANS = 4
_MASK = "?"


def available() -> bool:
    """Whether the scanner (`pglast`: an opt-in install, GPL-3.0-or-later) can be imported."""
    try:
        import pglast.parser  # noqa: F401
    except ImportError:
        return False
    return True


def _scan(text: str) -> tuple[list[Any], int]:
    """Tokens of the longest prefix of `text` the scanner reads, and that prefix's length.

    On a scan error (an unterminated literal or comment, trailing junk after a number) the
    text before the offending token is scanned again; nothing of the error message is
    kept, as it quotes the text it could not read."""
    from pglast.parser import ParseError, scan

    end = len(text)
    for _ in range(_MAX_RESCANS):
        try:
            return list(scan(text[:end])), end
        except ParseError as exc:
            where = exc.args[1] if len(exc.args) > 1 else None
        except UnicodeError as exc:  # lone surrogates: cannot be UTF-8 for the scanner
            where = getattr(exc, "start", None)
        if not isinstance(where, int) or not 0 <= where < end:
            break
        end = where
    return [], 0


def _same_end_without_standard_strings(token: str) -> bool:
    """Whether a quoted literal ends where it does even if the session that sent it had
    `standard_conforming_strings = off` (then `\\` escapes in plain strings, so `'a\\'`
    is not closed). The scanner reads the default (`on`); a text whose literal could end
    elsewhere is ambiguous, and what follows is masked."""
    quote = token.find("'")
    if quote < 0:
        return False
    inside, i = False, quote
    while i < len(token):
        char = token[i]
        if inside:
            if char == "\\":
                i += 1
            elif char == "'":
                if token[i + 1 : i + 2] == "'":
                    i += 1
                else:
                    inside = False
        elif char == "'":
            inside = True
        elif not char.isspace():
            return False
        i += 1
    return not inside


def _ambiguous(name: str, token: str) -> bool:
    """A quoted literal (not `E'…'`, not dollar-quoted) holding a backslash whose end
    depends on `standard_conforming_strings`."""
    if name not in _LITERALS - _NUMBERS or "\\" not in token or token[:1] in "Ee$":
        return False
    return not _same_end_without_standard_strings(token)


def _is_unary_sign(tok: Any, after: Any | None, before: Any | None) -> bool:
    """`tok` is a `+`/`-` right before the number `after` it, and not after a value
    (`before`, the previous token that is not a comment): its sign is part of the literal
    (`x = -5` and `x = - 5` show `x = ?`, `a-5` shows `a-?`)."""
    if tok.name not in _SIGNS or after is None or after.name not in _NUMBERS:
        return False
    if before is None:
        return True
    if before.name in _VALUE_ENDS:
        return False
    return before.kind in ("NO_KEYWORD", "RESERVED_KEYWORD")


def _rendered(text: str, tokens: Sequence[Any], scanned: int) -> str:
    """The tokens, literals as `?`, comments dropped, one space wherever the text had a gap
    or a comment; `?` closes it where the scanner stopped short or met an unknown token."""
    parts: list[str] = []
    gap = False
    position = 0
    complete = True
    before = None  # the previous token that is not a comment
    for i, tok in enumerate(tokens):
        gap = gap or tok.start > position
        position = tok.end + 1
        if tok.name in _COMMENTS:
            gap = True
            continue
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        unary = _is_unary_sign(tok, after, before)
        before = tok
        if unary:
            continue  # the number after it shows as `?`, its sign with it
        word = text[tok.start : tok.end + 1]
        if tok.name in _LITERALS:
            if _ambiguous(tok.name, word):
                complete = False
                break
            word = _MASK
        elif not (tok.name in _SHOWN or tok.name.startswith("ASCII_") or tok.kind != "NO_KEYWORD"):
            complete = False  # UNKNOWN (a control character) or a token this code does not know
            break
        if parts and gap:
            parts.append(" ")
        parts.append(word)
        gap = False
    if complete and (scanned < len(text) or text[position:scanned].strip()):
        complete = False  # the scanner stopped short (a NUL ends its C string)
    if not complete:
        parts.append((" " if parts else "") + _MASK)
    return "".join(parts)


def mask(text: str) -> str:
    """Every literal replaced with `?`, every comment removed (positional parameters `$1`
    stay); what cannot be scanned is masked from the first token that could not be read."""
    tokens, scanned = _scan(text)
    return _rendered(text, tokens, scanned)


def shown(text: str | None, limit: int = DEFAULT_LIMIT) -> str | None:
    """Masked, whitespace collapsed, cut to `limit` characters (with `…` when cut).

    Never raises: a hostile statement must not fail the poll that read it; if masking
    itself fails, only `?` is shown."""
    if text is None:
        return None
    try:
        masked = " ".join(mask(text).split())
    except Exception:
        masked = _MASK
    return masked if len(masked) <= limit else masked[: max(0, limit - 1)] + "…"
