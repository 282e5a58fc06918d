"""Small PromQL text utilities: find the metric names an expression reads, and turn a
Grafana query into plain PromQL.

Why hand-rolled: the checks need only the *names* of the series an expression selects, not
a full AST, and Prometheus offers no parse endpoint in the versions Debian ships. Whether
an expression actually parses is proven against a real Prometheus in the harness tests
(a parse error is an HTTP 400 from `/api/v1/query`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Words that look like identifiers but are operators, modifiers or literals.
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
        "start",
        "end",
    }
)

#: Modifiers followed by a parenthesised list of label names (not series).
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
_TOKEN = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))"
    r"|(?P<var>\$\{?\w+\}?)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?"
)

#: Values the dashboards' Grafana variables take when an expression is run outside Grafana.
GRAFANA_DEFAULTS: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}


def metric_names(expr: str) -> frozenset[str]:
    """Names of the series an expression selects (functions, labels and keywords excluded).

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / on(p) b'))
    ['a_bucket', 'b']
    """
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ hides the series name: {expr!r}")
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("{}", text)
    text = _BRACKETS.sub("[]", text)
    text = _OFFSET.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for token in _TOKEN.finditer(text):
        ident = token.group("ident")
        if ident is None or token.group("call") or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return frozenset(names)


def label_values_metric(query: str) -> str | None:
    """The metric of a Grafana `label_values(metric{...}, label)` variable query."""
    match = re.match(r"^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", query)
    return match.group(1) if match else None


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables (`$x`, `${x}`) so Prometheus can run the expression.

    Unknown dashboard variables default to `.*`, which is what "All" means in every filter
    the generated dashboards use (all of them are regex matchers).
    """
    values = {**GRAFANA_DEFAULTS, **(variables or {})}

    def repl(match: re.Match[str]) -> str:
        return values.get(match.group(1) or match.group(2), ".*")

    return re.sub(r"\$\{([a-zA-Z_]\w*)(?::\w+)?\}|\$([a-zA-Z_]\w*)", repl, expr)
