"""The sidecar never leaks a DSN's password nor a statement's literal values.

DSNs: every mistyped form libpq reads as key/value or as a broken URI, and correct ones
with hostile passwords, run through the config, the poller and the real `pool-monitor
sidecar` command; the sentinel password must reach none of the log, `/api/pools`,
`/readyz` and `/metrics`. Query text: every kind of literal and comment, cut statements,
and Hypothesis-built statements with a sentinel hidden in a literal or comment.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from demo_app.stack import libpq_dsn
from monitor.config import ConfigError
from monitor.sidecar import config, sqltext
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.postgres import (
    DsnError,
    PostgresCollector,
    describe_dsn,
    parse_dsn,
    safe_error,
)
from monitor.sidecar.runtime import Sidecar
from tests.test_sidecar_e2e import ROOT, free_port, stop_sidecar, wait_for

SENTINEL = "S3cr3t-xyz"

#: Passwords a DSN may legitimately carry (quoted or %-encoded properly).
PASSWORDS = [
    SENTINEL,
    f"two words {SENTINEL}",
    f'it\'s "{SENTINEL}"',
    f"at@{SENTINEL}@",
    f"sl/{SENTINEL}/ash",
    f"пароль-{SENTINEL}-✓",
    f"back\\slash {SENTINEL}",
    f"{SENTINEL}:colon?q#h%25&x=y",
]

#: Mistyped DSNs, the password written raw: none may be echoed.
MISTYPED = [
    f"postgresql//u:{SENTINEL}@h",
    f"u:{SENTINEL}@h/db",
    f"host=h password=a {SENTINEL}",
    f"host=h password=a b{SENTINEL} user=u",
    f"host=h password='{SENTINEL}",
    f"postgresql://u:p@{SENTINEL}@h/db",
    f"postgresql://u:p/{SENTINEL}@h/db",
    f"postgresql://u:{SENTINEL}/db",
    f"postgresql://u:1/{SENTINEL}@h/db",
    f"postgresql://u:1/db?user={SENTINEL}@h/db",
    f"postgresql://u:p {SENTINEL}@h/db",
    f"postgresql://u:{SENTINEL}@h:5432/db?bogus=1",
    f"host=h port={SENTINEL}",
]


def uri(password: str, host: str = "127.0.0.1", port: int = 5432, user: str = "monitor") -> str:
    """A correct URI: user and password %-encoded."""
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/app"


def keyvalue(password: str, host: str = "127.0.0.1", port: int = 5432) -> str:
    """A correct key/value DSN, quoted by psycopg itself."""
    return make_conninfo(host=host, port=str(port), dbname="app", user="monitor", password=password)


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert SENTINEL not in text, text


# -- DSN parsing and description ---------------------------------------------------------


@pytest.mark.parametrize("password", PASSWORDS)
def test_correct_dsns_parse_and_describe_without_the_password(password: str) -> None:
    for dsn in (uri(password), keyvalue(password)):
        assert parse_dsn(dsn)["password"] == password
        assert describe_dsn(dsn) == "host=127.0.0.1 port=5432 dbname=app user=monitor"


def test_description_shows_only_host_port_dbname_user() -> None:
    dsn = "host=/run/pg port=5433 dbname='my app' user=me sslmode=require options='-c x=1'"
    assert describe_dsn(dsn) == "host=/run/pg port=5433 dbname='my app' user=me"
    assert describe_dsn("") == "libpq defaults"
    assert describe_dsn(None) == "no DSN"
    # a value holding the password is hidden (user = password happens)
    assert describe_dsn(f"host=h user={SENTINEL} password={SENTINEL}") == "host=h user=(hidden)"


@pytest.mark.parametrize("dsn", MISTYPED)
def test_mistyped_dsns_do_not_parse_and_are_never_quoted(dsn: str) -> None:
    with pytest.raises(DsnError) as info:
        parse_dsn(dsn)
    assert str(info.value).startswith("does not parse")
    # no chained psycopg error (which quotes the text) shows in a traceback
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert_clean(str(info.value), describe_dsn(dsn))
    # psycopg's own message does quote it: that is what must not get out
    if dsn in MISTYPED[:2]:
        with pytest.raises(psycopg.ProgrammingError, match=SENTINEL):
            conninfo_to_dict(dsn)


@pytest.mark.parametrize("dsn", MISTYPED)
def test_startup_error_names_the_source_not_the_value(dsn: str, tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(dsn + "\n")
    cases = [
        (["--postgres-dsn", dsn], {}, "--postgres-dsn"),
        (["--postgres-dsn-file", str(dsn_file)], {}, f"--postgres-dsn-file {dsn_file}"),
        ([], {config.DSN_ENV: dsn}, f"${config.DSN_ENV}"),
    ]
    for argv, environ, source in cases:
        with pytest.raises(ConfigError) as info:
            config.parse(argv, environ=environ)
        message = str(info.value)
        assert message.startswith(f"PostgreSQL DSN (from {source}) does not parse"), message
        assert_clean(message)


def test_safe_error_removes_the_dsn_and_password() -> None:
    password = f"a  b\t{SENTINEL}"
    dsn = keyvalue(password)
    leaky = psycopg.OperationalError(
        f"connection failed: {dsn}\n password {password!s} or {quote(password, safe='')}"
    )
    message = safe_error(leaky, dsn)
    assert message.startswith("OperationalError: connection failed: ***")
    assert_clean(message)
    assert "\n" not in message and "\t" not in message


_HOSTILE = st.text(
    alphabet=st.sampled_from(list(" @/:?#%'\"\\&;,.-_+ü✓\tabc")) | st.characters(), max_size=8
)


@given(before=_HOSTILE, after=_HOSTILE, form=st.sampled_from(["uri", "kv"]))
@settings(max_examples=400, deadline=None)
def test_raw_hostile_passwords_never_described(before: str, after: str, form: str) -> None:
    """A password written raw (not quoted, not %-encoded) ends up nowhere we show: the
    DSN does not parse, or it parses and its password holds the sentinel. (In key/value
    form an `=` in the password legitimately makes `password=a user=x`, so none here.)"""
    password = before + SENTINEL + after
    if form == "uri":
        dsn = f"postgresql://monitor:{password}@db:5432/app"
    else:
        password = password.replace("=", "")
        dsn = f"host=db password={password} user=monitor"
    assert_clean(describe_dsn(dsn))
    try:
        params = parse_dsn(dsn)
    except DsnError as exc:
        assert_clean(str(exc))
        return
    assert SENTINEL in params.get("password", "")
    leaky = psycopg.OperationalError(f"at {dsn}: {params['password']}")
    assert_clean(safe_error(leaky, dsn))


# -- the poller, in process --------------------------------------------------------------


async def _served(dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Run the real sidecar threads on `dsn` until a poll is done; what they served and
    logged (`/api/pools`, `/readyz`, `/metrics`, the log)."""
    caplog.set_level(logging.DEBUG)
    cfg = SidecarConfig(
        snapshot_dir=str(tmp_path),
        listen_host="127.0.0.1",
        postgres_dsn=dsn,
        postgres_interval=0.1,
    )
    sidecar = Sidecar(cfg)
    sidecar.pg.backoff_max = 0.1
    sidecar.pg.connect_timeout = 2
    sidecar.start()
    try:
        wait_for(lambda: sidecar.pg.view.polled_at is not None, 15, "a poll")
        transport = httpx.ASGITransport(create_app(sidecar, manage=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            responses = [await http.get(path) for path in ("/api/pools", "/readyz", "/metrics")]
    finally:
        sidecar.stop()
    codes = [r.status_code for r in responses]
    assert codes[0] == codes[2] == 200 and codes[1] in (200, 503), codes  # not refusals
    return [*(r.text for r in responses), caplog.text, str(sidecar.pg.view.error)]


@pytest.mark.parametrize("dsn", MISTYPED)
async def test_poller_on_a_mistyped_dsn(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A DSN that skipped the config check (an embedding app) is still never echoed."""
    *served, error = await _served(dsn, tmp_path, caplog)
    assert error.startswith("invalid DSN: does not parse")
    assert_clean(*served, error)


@pytest.mark.parametrize("password", PASSWORDS)
async def test_poller_on_a_closed_port(
    password: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    for dsn in (uri(password, port=port), keyvalue(password, port=port)):
        *served, error = await _served(dsn, tmp_path, caplog)
        assert error.startswith("OperationalError: "), error
        assert_clean(*served, error)
        caplog.clear()


def _with_password(database_url: str, password: str, **extra: str) -> str:
    """The test server's DSN with a password (and user) set, key/value form."""
    return make_conninfo(libpq_dsn(database_url), password=password, **extra)


@pytest.mark.parametrize("password", [SENTINEL, f"it's {SENTINEL} \\ ✓"])
async def test_poller_on_the_real_server_with_a_wrong_password_or_user(
    password: str, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded server trusts local connections (a wrong password still connects);
    an unknown role is refused: both paths stay clean."""
    for dsn in (
        _with_password(database_url, password),
        _with_password(database_url, password, user="no_such_role"),
    ):
        *served, error = await _served(dsn, tmp_path, caplog)
        assert_clean(*served, error)
        caplog.clear()


def test_query_text_from_the_real_server_is_masked(database_url: str) -> None:
    """A session's last statement, with a sentinel in every kind of literal and comment,
    reaches the poller's rows masked."""
    dsn = libpq_dsn(database_url)
    sql = (
        f"SELECT 'it''s {SENTINEL}' AS a, E'\\'{SENTINEL}' AS b, $q${SENTINEL}$q$ AS c, "
        f"0x1F + 1_000 AS d /* {SENTINEL} */ -- {SENTINEL}\n"
    )
    with psycopg.connect(dsn, application_name="secret-query", autocommit=True) as conn:
        conn.execute(sql)
        collector = PostgresCollector(dsn, show_query_text=True, query_text_limit=500)
        try:
            assert collector.poll()
        finally:
            collector.stop()
    queries = [
        b.query for b in collector.view.backends.values() if b.application_name == "secret-query"
    ]
    assert queries == ["SELECT ? AS a, ? AS b, ? AS c, ? + ? AS d"]


# -- the real command --------------------------------------------------------------------


def _run_sidecar(dsn_args: list[str], env: dict[str, str]) -> list[str]:
    """Start `pool-monitor sidecar` (DEBUG log), wait for its first PostgreSQL poll, and
    return `/api/pools`, `/readyz`, `/metrics` and the whole log."""
    tmp = Path(tempfile.mkdtemp(prefix="pool-monitor-secrets-"))
    snapdir = tmp / "snapshots"
    snapdir.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "monitor.cli", "sidecar", "--snapshot-dir", str(snapdir)]
    command += [*dsn_args, "--postgres-interval", "0.2", "--listen", f"127.0.0.1:{port}"]
    command += ["--log-level", "DEBUG"]
    log = tmp / "sidecar.log"
    log_file = open(log, "wb")  # noqa: SIM115 - the process writes it until the end
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)

    def polled() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return http.get("/api/pools").json()["postgres"]["polled_at"] is not None
        except httpx.TransportError:
            return False

    try:
        wait_for(polled, 30, "the sidecar's first PostgreSQL poll")
        responses = [http.get(path) for path in ("/api/pools", "/readyz", "/metrics")]
        codes = [r.status_code for r in responses]
        assert codes[0] == codes[2] == 200 and codes[1] in (200, 503), codes
        bodies = [r.text for r in responses]
    finally:
        stop_sidecar(process, http, log_file, snapdir)
        text = log.read_text(encoding="utf-8", errors="replace")
        shutil.rmtree(tmp, ignore_errors=True)
    assert "polling PostgreSQL every 0.2 s at host=" in text
    return [*bodies, text]


def _environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != config.DSN_ENV}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_command_on_a_closed_port() -> None:
    port = free_port()
    for password in (f"two words {SENTINEL}", f"at@{SENTINEL}/✓"):
        served = _run_sidecar(["--postgres-dsn", uri(password, port=port)], _environ())
        assert '"up":false' in served[0].replace(" ", "")
        assert_clean(*served)
    served = _run_sidecar([], _environ(**{config.DSN_ENV: keyvalue(SENTINEL, port=port)}))
    assert_clean(*served)


def test_command_on_the_real_server(database_url: str, tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(_with_password(database_url, f"it's {SENTINEL}") + "\n")
    served = _run_sidecar(["--postgres-dsn-file", str(dsn_file)], _environ())
    assert_clean(*served)
    refused = _with_password(database_url, SENTINEL, user="no_such_role")
    served = _run_sidecar(["--postgres-dsn", refused], _environ())
    assert "no_such_role" in served[0]  # libpq's reason is kept, the password is not
    assert_clean(*served)


@pytest.mark.parametrize("dsn", MISTYPED[:4] + MISTYPED[5:7])
def test_command_refuses_a_mistyped_dsn(dsn: str) -> None:
    for argv, env, source in (
        (["--postgres-dsn", dsn], _environ(), "--postgres-dsn"),
        ([], _environ(**{config.DSN_ENV: dsn}), f"${config.DSN_ENV}"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "monitor.cli", "sidecar", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert f"PostgreSQL DSN (from {source}) does not parse" in done.stderr
        assert_clean(done.stdout, done.stderr)


# -- query text --------------------------------------------------------------------------

LEAKS = [
    f"SELECT 'it''s {SENTINEL}'",
    f"SELECT 'a\\'{SENTINEL}'",  # a backslash-quote: one literal only if the session said so
    f"SELECT 'a\\', {SENTINEL}, 'b'",  # standard_conforming_strings off: one literal
    f"SELECT E'\\'{SENTINEL}\\''",
    f"SELECT e'\\\\{SENTINEL}\\\\'",
    f"SELECT $${SENTINEL}$$",
    f"SELECT $tag${SENTINEL} $$ 'x' $tag$",
    f"SELECT U&'{SENTINEL}'",
    f"SELECT N'{SENTINEL}'",
    f"SELECT B'{SENTINEL}', X'{SENTINEL}'",
    f"SELECT 'a'\n'{SENTINEL}'",
    f"SELECT 1 -- {SENTINEL}",
    f"SELECT 1 -- {SENTINEL}\nFROM t",
    f"SELECT /* {SENTINEL} */ 1",
    f"SELECT /* a /* nested */ {SENTINEL} */ 1",
    f"SELECT a FROM t WHERE b = '{SENTINEL}",  # cut at track_activity_query_size
    f"SELECT a FROM t WHERE b = $${SENTINEL}",
    f"SELECT a FROM t /* {SENTINEL}",
    f'SELECT a FROM t WHERE "{SENTINEL}',
    f"SELECT 123{SENTINEL}",
    f"SELECT 1 \x00 {SENTINEL}",
    f"SELECT \x01 {SENTINEL}",
    f"SELECT \ud800 '{SENTINEL}'",
]


@pytest.mark.parametrize("sql", LEAKS)
def test_no_literal_or_comment_survives(sql: str) -> None:
    shown = sqltext.shown(sql, 10000)
    assert shown is not None and shown.startswith("SELECT")
    assert_clean(shown)
    assert "S3cr3t" not in shown and "xyz" not in shown


def test_numbers_of_every_kind_and_parameters() -> None:
    sql = "SELECT 0x1F, 0o17, 0b101, 1_000, 1.5e3, .5, -7, a-5 FROM t WHERE id = $1 AND n = $12"
    assert sqltext.shown(sql) == "SELECT ?, ?, ?, ?, ?, ?, ?, a-? FROM t WHERE id = $1 AND n = $12"
    assert sqltext.shown("SELECT 'x'::bytea, '\\x01'::bytea") == "SELECT ?::bytea, ?::bytea"
    assert sqltext.shown('select\n\t*  from\t"My Table"  -- why\n') == 'select * from "My Table"'
    assert sqltext.shown("UPDATE t SET a = 'x' WHERE b = 1", 20) == "UPDATE t SET a = ? …"


_WORDS = st.sampled_from(
    [
        "SELECT",
        "FROM",
        "WHERE",
        "AND",
        "t",
        "col_1",
        "$1",
        "=",
        ",",
        "(",
        ")",
        "::",
        "||",
        "-",
        "+",
        "42",
        "1.5",
        "'ok'",
        "$$ok$$",
        "/* ok */",
        "-- ok\n",
        "E'o\\'k'",
        "B'01'",
        "*",
    ]
)
_CONTENT = st.text(max_size=12)


def _literal_with_sentinel() -> st.SearchStrategy[str]:
    """A literal or comment holding the sentinel, written as PostgreSQL reads it."""
    text = st.builds(lambda a, b: a + SENTINEL + b, _CONTENT, _CONTENT)
    return st.one_of(
        text.map(lambda s: "'" + s.replace("'", "''") + "'"),
        text.map(lambda s: "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"),
        st.builds(
            lambda s, tag: f"${tag}${s.replace('$', '')}${tag}$",
            text,
            st.text(alphabet="abc_", max_size=3),
        ),
        text.map(lambda s: "U&'" + s.replace("\\", "").replace("'", "''") + "'"),
        text.map(lambda s: "-- " + s.replace("\n", " ").replace("\r", " ") + "\n"),
        text.filter(lambda s: "*/" not in s and "/*" not in s).map(lambda s: f"/* {s} */"),
    )


@given(
    before=st.lists(_WORDS, max_size=6),
    secret=_literal_with_sentinel(),
    after=st.lists(_WORDS, max_size=6),
    cut=st.integers(min_value=0, max_value=400),
)
@settings(max_examples=500, deadline=None)
def test_sentinel_in_a_literal_never_survives(
    before: list[str], secret: str, after: list[str], cut: int
) -> None:
    sql = " ".join([*before, secret, *after])
    assert_clean(sqltext.shown(sql, 10000) or "")
    assert_clean(sqltext.shown(sql[:cut], 10000) or "")  # cut anywhere, as the server does


@given(text=st.text(), limit=st.integers(min_value=1, max_value=300))
@settings(max_examples=500, deadline=None)
def test_shown_never_raises(text: str, limit: int) -> None:
    shown = sqltext.shown(text, limit)
    assert shown is not None and len(shown) <= limit


def test_shown_is_fast_on_a_large_statement() -> None:
    sql = "SELECT " + ", ".join(f"'{SENTINEL}{i}'" for i in range(5000))
    started = time.perf_counter()
    shown = sqltext.shown(sql, 10000)
    assert time.perf_counter() - started < 2
    assert_clean(shown or "")
