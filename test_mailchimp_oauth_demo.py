"""Tests for mailchimp_oauth_demo, in the module's order: the pure core first, then the real
server on a free port with a scripted stand-in for Mailchimp (no network, no mock.patch)."""

from __future__ import annotations

import ast
import base64
import builtins
import contextlib
import doctest
import email.message
import hashlib
import html
import html.parser
import http.client
import importlib.util
import io
import json
import logging
import math
import os
import pathlib
import re
import select
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import symtable
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import pytest

import mailchimp_oauth_demo as demo

CLIENT_ID = "client-id-1234"
CLIENT_SECRET = "client-secret-5f0c9e2a7d"
CODE = "code-8d1f0b6e2a944c53"
TOKEN = "0123456789abcdef0123456789abcdef"
CONFIG = demo.Config(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                     base_url="http://127.0.0.1:3000")
TOKEN_URL = "https://login.mailchimp.com/oauth2/token"
METADATA_URL = "https://login.mailchimp.com/oauth2/metadata"
PING_URL = "https://us19.api.mailchimp.com/3.0/ping"
METADATA = {"dc": "us19", "role": "owner", "accountname": "Freddie's Jokes", "user_id": 42,
            "login": {"login_id": 42, "login_name": "freddie"},
            "login_url": "https://login.mailchimp.com",
            "api_endpoint": "https://us19.api.mailchimp.com"}
SCRIPT = "<script>alert(1)</script>"


def flow_error(call: Any, *args: Any) -> demo.FlowError:
    with pytest.raises(demo.FlowError) as caught:
        call(*args)
    return caught.value


@dataclass
class Sent:
    """One request the app sent to the stand-in."""

    method: str
    url: str
    headers: dict[str, str]
    form: dict[str, list[str]]
    timeout: float


class FakeMailchimp:
    """Stands in for urllib's opener: scripted replies by URL, and a record of what was sent."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.replies: dict[str, tuple[int, Any] | BaseException] = {
            TOKEN_URL: (200, {"access_token": TOKEN, "expires_in": 0, "scope": None}),
            METADATA_URL: (200, METADATA),
            PING_URL: (200, {"health_status": "Everything's Chimpy!"}),
        }
        self.before: Callable[[str], object] = lambda url: None  # a test's hook: hold a call

    def open(self, request: urllib.request.Request, /, *, timeout: float) -> Any:
        data = request.data if isinstance(request.data, bytes) else b""
        self.before(request.full_url)
        self.sent.append(Sent(request.get_method(), request.full_url,
                              {name.title(): value for name, value in request.header_items()},
                              urllib.parse.parse_qs(data.decode()), timeout))
        scripted = self.replies.get(request.full_url, (404, {"title": "Resource Not Found"}))
        if isinstance(scripted, BaseException):
            raise scripted
        status, body = scripted
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        if status >= 300:  # as urllib does
            raise urllib.error.HTTPError(request.full_url, status, "", email.message.Message(),
                                         io.BytesIO(raw))
        return urllib.response.addinfourl(io.BytesIO(raw), email.message.Message(),
                                          request.full_url, status)

    def urls(self) -> list[str]:
        return [sent.url for sent in self.sent]


@pytest.fixture
def mailchimp() -> FakeMailchimp:
    return FakeMailchimp()


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def test_a_config_without_its_own_address_sends_no_relative_redirect_uri() -> None:
    with pytest.raises(demo.ConfigError, match="base_url"):
        demo.authorize_url(demo.Config(CLIENT_ID, CLIENT_SECRET), "the-state")


@pytest.mark.parametrize("base_url, says", [
    ("127.0.0.1:3000", "must look like"), ("javascript:alert(1)", "must look like"),
    ("https://user@demo.example", "must look like"), ("http://127.0.0.1:99999", "must look like"),
    ("http://127.0.0.1:3000/app", "has a path"), ("http://127.0.0.1:3000/?x", "has a query"),
    ("http://127.0.0.1:3000#top", "has a fragment"),
    ("http://example.com", "plain text"), ("http://192.168.1.5:3000", "plain text"),
])
def test_config_refuses_a_base_url_that_is_not_a_safe_origin(base_url: str, says: str) -> None:
    with pytest.raises(demo.ConfigError, match=f"--base-url '{re.escape(base_url)}' .*{says}"):
        demo.config_from_env(ENV, base_url=base_url)


@pytest.mark.parametrize("base_url, origin", [
    ("https://Example.COM:443/", "https://example.com"), ("http://LOCALHOST:80", "http://localhost"),
    ("http://[::1]:3000", "http://[::1]:3000"), ("https://demo.example:8443", "https://demo.example:8443"),
])
def test_config_writes_the_base_url_as_browsers_write_origins(base_url: str, origin: str) -> None:
    config = demo.config_from_env(ENV, base_url=base_url)
    assert (config.base_url, config.redirect_uri) == (origin, origin + demo.CALLBACK_PATH)


def test_config_never_shows_the_secret_in_its_repr() -> None:
    assert CLIENT_SECRET not in repr(CONFIG)


@pytest.mark.parametrize("field, url, says", [
    ("login_url", "http://login.example.com", "must use https://"),
    ("login_url", "https://user@login.example.com", "nothing else"),
    ("api_url", "https://api.example/3.0", "must contain {dc}"),
    ("api_url", "http://{dc}.example/3.0", "must use https://"),
])
def test_config_refuses_a_mailchimp_url_it_would_not_send_secrets_to(
        field: str, url: str, says: str) -> None:
    with pytest.raises(demo.ConfigError, match=re.escape(says)) as refused:
        replace(CONFIG, **{field: url})  # type: ignore[arg-type]
    assert str(refused.value).startswith(field)  # named as Config names it


# ---------------------------------------------------------------------------
# The flow: steps 2 to 6, with a scripted Mailchimp
# ---------------------------------------------------------------------------

def test_authorize_url_carries_exactly_the_four_parameters_and_no_scope() -> None:
    url = demo.authorize_url(CONFIG, "the-state")
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "login.mailchimp.com",
                                                        "/oauth2/authorize")
    assert urllib.parse.parse_qs(parts.query) == {
        "response_type": ["code"], "client_id": [CLIENT_ID],
        "redirect_uri": ["http://127.0.0.1:3000/oauth/mailchimp/callback"],
        "state": ["the-state"]}


STATE = "s" * 43


def test_check_callback_gives_the_code_when_the_state_is_this_browsers() -> None:
    assert demo.check_callback(f"code={CODE}&state={STATE}&other=ignored", STATE) == CODE


@pytest.mark.parametrize("query, state, status, says", [
    ("code=abc", STATE, 400, "has no state"),
    ("code=abc&state=" + "x" * 43, STATE, 400, "does not carry the state"),
    (f"code=abc&state={STATE}", "", 400, "does not carry the state"),  # no login started here
    (f"code=a&state={STATE}&state=y", STATE, 400, "could not be read"),  # which state?
    (f"code=%ff%fe&state={STATE}", STATE, 400, "could not be read"),  # not UTF-8
    ("&".join(f"f{n}=1" for n in range(50)), STATE, 400, "could not be read"),  # a flood
    (f"state={STATE}&error=access_denied&error_description=No+thanks", STATE, 403,
     "Access was not granted, so nothing was shared (access_denied: No thanks)"),
    (f"state={STATE}&error=server_error", STATE, 502, "refused the authorization"),
    (f"state={STATE}", STATE, 400, "carries no code"),
    (f"code=a%0D%0ASet-Cookie:x&state={STATE}", STATE, 400, "does not look like one"),
    (f"code={'x' * 513}&state={STATE}", STATE, 400, "does not look like one"),
    (f"code=caf%C3%A9&state={STATE}", STATE, 400, "does not look like one"),
])
def test_check_callback_refuses_a_callback_it_cannot_trust(query: str, state: str, status: int,
                                                           says: str) -> None:
    err = flow_error(demo.check_callback, query, state)
    assert (err.status, err.step) == (status, demo.STEP_CALLBACK) and says in err.message


def test_exchange_code_posts_the_five_fields_as_a_form_and_returns_the_token(
        mailchimp: FakeMailchimp) -> None:
    assert demo.exchange_code(mailchimp, CONFIG, CODE) == TOKEN
    [sent] = mailchimp.sent
    assert (sent.method, sent.url, sent.timeout) == ("POST", TOKEN_URL, CONFIG.timeout)
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.form == {"grant_type": ["authorization_code"], "client_id": [CLIENT_ID],
                         "client_secret": [CLIENT_SECRET], "code": [CODE],
                         "redirect_uri": ["http://127.0.0.1:3000/oauth/mailchimp/callback"]}
    assert "Authorization" not in sent.headers


def test_exchange_code_takes_the_token_reply_mailchimp_sends(mailchimp: FakeMailchimp) -> None:
    reply = b'{"access_token": "925680f04933b28f128d721fdf8949fa", "expires_in": 0, "scope": null}'
    mailchimp.replies[TOKEN_URL] = (200, reply)  # as passport-mailchimp's tests have it
    assert demo.exchange_code(mailchimp, CONFIG, CODE) == "925680f04933b28f128d721fdf8949fa"


@pytest.mark.parametrize("body", [
    b"not json", b"[" * 50_000, b"\xff\xfe", json.dumps([TOKEN]).encode(),
    json.dumps({"expires_in": 0}).encode(), json.dumps({"access_token": ""}).encode(),
    json.dumps({"access_token": 12345}).encode(),
    json.dumps({"access_token": "abc\r\nX-Injected: 1"}).encode(),
    json.dumps({"access_token": "two words"}).encode(),
])
def test_exchange_code_refuses_a_reply_without_a_usable_token(
        mailchimp: FakeMailchimp, body: bytes) -> None:
    mailchimp.replies[TOKEN_URL] = (200, body)
    err = flow_error(demo.exchange_code, mailchimp, CONFIG, CODE)
    assert (err.status, err.step) == (HTTPStatus.BAD_GATEWAY, demo.STEP_TOKEN)


@pytest.mark.parametrize("error, status, hint", [
    ("invalid_client", 401, demo.HINT_ROTATED_SECRET),  # the secret was rotated
    ("invalid_grant", 400, demo.HINT_OLD_CODE),  # not the secret's fault
])
def test_a_refused_token_request_quotes_mailchimp_and_names_the_likely_cause(
        mailchimp: FakeMailchimp, error: str, status: int, hint: str) -> None:
    mailchimp.replies[TOKEN_URL] = (status, {"error": error, "error_description": "Said so"})
    err = flow_error(demo.exchange_code, mailchimp, CONFIG, CODE)
    assert err.status == HTTPStatus.BAD_GATEWAY and err.hint == hint
    assert f"{status}: {error}: Said so" in err.message


def test_find_account_asks_with_the_oauth_scheme_for_the_prefix_and_name(
        mailchimp: FakeMailchimp) -> None:
    assert demo.find_account(mailchimp, CONFIG, TOKEN) == demo.Account("us19", "Freddie's Jokes")
    [sent] = mailchimp.sent
    assert (sent.method, sent.url, sent.headers["Authorization"]) == (
        "GET", METADATA_URL, f"OAuth {TOKEN}")


@pytest.mark.parametrize("dc", [
    "evil.example.com/x#", "us1.evil", "us1@127.0.0.9:1", "us19\r\nX-Injected: 1", "us19\n",
    "US19", "us", "19", "", 19, None, "us\u0661\u0669",
])
def test_find_account_refuses_a_server_prefix_that_could_redirect_the_token(
        mailchimp: FakeMailchimp, dc: Any) -> None:
    mailchimp.replies[METADATA_URL] = (200, {**METADATA, "dc": dc})
    err = flow_error(demo.find_account, mailchimp, CONFIG, TOKEN)
    assert (err.status, err.step) == (HTTPStatus.BAD_GATEWAY, demo.STEP_METADATA)


# Replies as Mailchimp really sends them, from other integrations' test suites and issues.
@pytest.mark.parametrize("metadata, name", [
    ({"dc": "us19", "role": "owner", "accountname": "Freddie's Jokes", "user_id": 42,
      "login": {"email": "f@example.com", "avatar": None, "login_id": 42,
                "login_name": "freddie", "login_email": "f@example.com"},
      "login_url": "https://login.mailchimp.com", "api_endpoint": "https://us19.api.mailchimp.com"},
     "Freddie's Jokes"),  # integer ids and a null avatar, as social-core's fixture has them
    ({"dc": "us19", "login_url": "https://login.mailchimp.com",
      "api_endpoint": "https://us19.api.mailchimp.com"}, demo.NO_NAME),  # no accountname at all
    ({"dc": "us19", "accountname": None}, demo.NO_NAME),
    ({"dc": "us19", "accountname": ["not", "text"]}, demo.NO_NAME),
])
def test_find_account_takes_the_metadata_mailchimp_sends(
        mailchimp: FakeMailchimp, metadata: dict[str, Any], name: str) -> None:
    mailchimp.replies[METADATA_URL] = (200, metadata)
    assert demo.find_account(mailchimp, CONFIG, TOKEN) == demo.Account("us19", name)


def test_a_metadata_reply_of_200_carrying_an_error_is_a_refusal(mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[METADATA_URL] = (200, {"error": "invalid_token"})  # as Airbyte saw it
    err = flow_error(demo.find_account, mailchimp, CONFIG, TOKEN)
    assert (err.status, err.step, err.hint) == (HTTPStatus.BAD_GATEWAY, demo.STEP_METADATA,
                                                demo.HINT_METADATA_TOKEN)
    assert "invalid_token" in err.message


def test_ping_calls_the_api_at_the_accounts_prefix_with_the_bearer_token(
        mailchimp: FakeMailchimp) -> None:
    assert demo.ping(mailchimp, CONFIG, "us19", TOKEN) == "Everything's Chimpy!"
    [sent] = mailchimp.sent
    assert (sent.url, sent.headers["Authorization"]) == (PING_URL, f"Bearer {TOKEN}")


def test_a_refused_ping_quotes_the_api_problem_and_suggests_revoked_access(
        mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[PING_URL] = (401, {"title": "API Key Invalid", "detail": "Wrong dc."})
    err = flow_error(demo.ping, mailchimp, CONFIG, "us19", TOKEN)
    assert "401: API Key Invalid: Wrong dc." in err.message
    assert err.hint.startswith(demo.HINT_REVOKED) and err.mailchimp_status == 401


def test_the_token_header_is_not_carried_across_a_redirect() -> None:
    request = demo.authorized_request(METADATA_URL, f"OAuth {TOKEN}")
    assert "Authorization" not in request.headers  # urllib copies only these on a redirect
    assert request.unredirected_hdrs["Authorization"] == f"OAuth {TOKEN}"


def test_connect_runs_steps_3_to_6_in_order(mailchimp: FakeMailchimp) -> None:
    connection = demo.connect(mailchimp, CONFIG, f"code={CODE}&state={STATE}", STATE)
    assert (connection.access_token, connection.server_prefix, connection.account_name,
            connection.health_status) == (TOKEN, "us19", "Freddie's Jokes",
                                          "Everything's Chimpy!")
    assert mailchimp.urls() == [TOKEN_URL, METADATA_URL, PING_URL]
    for sent in mailchimp.sent[1:]:  # metadata and ping carry the token, and nothing else secret
        assert CLIENT_SECRET not in str(sent) and CODE not in str(sent)


def test_connect_sends_nothing_for_a_callback_it_cannot_trust(mailchimp: FakeMailchimp) -> None:
    flow_error(demo.connect, mailchimp, CONFIG, f"code={CODE}&state={STATE}", "x" * 43)
    assert mailchimp.sent == []


@pytest.mark.parametrize("text, expected", [
    ("plain", "plain"), ("a\r\nb\x1b[31m", "a  b [31m"), ("x" * 300, "x" * 200 + "..."),
])
def test_printable_keeps_outside_text_to_one_bounded_line(text: str, expected: str) -> None:
    assert demo.printable(text) == expected


def test_mask_shows_only_the_last_four_characters() -> None:
    assert demo.mask(TOKEN) == "...cdef"
    assert demo.mask("short") == "..."


# ---------------------------------------------------------------------------
# Talking to Mailchimp: no answer, an error answer, too big an answer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("failure, status", [
    (socket.timeout("timed out"), HTTPStatus.GATEWAY_TIMEOUT),  # noqa: UP041 -- Python 3.9's
    (TimeoutError(), HTTPStatus.GATEWAY_TIMEOUT),
    (urllib.error.URLError(socket.timeout("timed out")),  # noqa: UP041 -- Python 3.9's
     HTTPStatus.GATEWAY_TIMEOUT),
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
     HTTPStatus.BAD_GATEWAY),
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
     HTTPStatus.BAD_GATEWAY),
    (http.client.RemoteDisconnected("closed"), HTTPStatus.BAD_GATEWAY),
    (ConnectionResetError(104, "reset"), HTTPStatus.BAD_GATEWAY),
])
def test_no_answer_is_a_504_or_a_502(mailchimp: FakeMailchimp, failure: BaseException,
                                     status: HTTPStatus) -> None:
    mailchimp.replies[TOKEN_URL] = failure
    err = flow_error(demo.exchange_code, mailchimp, replace(CONFIG, timeout=3), CODE)
    assert (err.status, err.step) == (status, demo.STEP_TOKEN)
    assert mailchimp.sent[0].timeout == 3


def test_an_error_status_is_read_as_an_answer(mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[TOKEN_URL] = (400, {"error": "invalid_grant"})
    sent = demo.send(mailchimp, urllib.request.Request(TOKEN_URL), 3, demo.STEP_TOKEN)
    assert (sent.status, sent.body) == (400, b'{"error": "invalid_grant"}')


def test_an_oversized_reply_is_refused(mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[TOKEN_URL] = (200, b" " * (demo.MAX_REPLY_BYTES + 1))
    err = flow_error(demo.exchange_code, mailchimp, CONFIG, CODE)
    assert err.status == HTTPStatus.BAD_GATEWAY and "oversized" in err.message


class EndlessReply:
    """A 200 whose body never ends, counting what is read of it (and failing past 1 MB, so
    that a reader with no bound fails the test rather than hanging it)."""

    status = 200

    def __init__(self) -> None:
        self.taken = 0

    def read1(self, size: int) -> bytes:
        self.taken += size
        assert self.taken < 1_000_000, "read without a bound"
        return b" " * size

    def close(self) -> None:
        pass


def test_a_reply_is_read_up_to_the_cap_and_no_further() -> None:
    reply = EndlessReply()

    class Opener:
        def open(self, request: urllib.request.Request, /, *, timeout: float) -> EndlessReply:
            return reply

    err = flow_error(demo.exchange_code, Opener(), CONFIG, CODE)
    assert "oversized" in err.message and reply.taken == demo.MAX_REPLY_BYTES + 1


class RawUpstream:
    """A server on 127.0.0.1 that answers each request by running answer(socket), and counts
    the requests: for replies that no well-behaved server, ours included, would send."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.answer, self.requests, self.stopping = answer, 0, False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while True:
            sock, _ = self.listener.accept()
            with sock:
                if self.stopping:
                    return
                request = sock.makefile("rb")
                while request.readline() not in (b"\r\n", b""):  # the head; GETs and tiny forms
                    pass
                self.requests += 1
                with contextlib.suppress(OSError):  # the app may hang up mid-answer
                    self.answer(sock)

    def __enter__(self) -> RawUpstream:  # noqa: PYI034 -- typing.Self is Python 3.11+
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        socket.create_connection(self.listener.getsockname()).close()  # wakes accept()
        self.thread.join()
        self.listener.close()


NO_PROXY = urllib.request.ProxyHandler({})  # the suite ignores http_proxy: all is on loopback


@pytest.mark.parametrize("location", ["ftp://evil.example/token", "http://[::1/x", "/again"])
def test_a_redirect_from_mailchimp_is_a_502_and_is_not_followed(location: str) -> None:
    def redirect(sock: socket.socket) -> None:
        sock.sendall(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\n"
                     "Content-Length: 0\r\n\r\n".encode())

    with RawUpstream(redirect) as upstream:
        config = replace(CONFIG, login_url=upstream.url)
        err = flow_error(demo.exchange_code, demo.new_opener(NO_PROXY), config, CODE)
    assert (err.status, err.mailchimp_status) == (HTTPStatus.BAD_GATEWAY, 302)
    assert "302" in err.message and "not followed" in err.message and upstream.requests == 1


def test_a_reply_trickling_in_is_cut_off_at_the_timeout_with_a_504() -> None:
    body = json.dumps({"access_token": TOKEN, "padding": "x" * 60}).encode()  # 100 bytes
    sent = []

    def trickle(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for byte in body:  # a byte every 20 ms: 2 s in all, each wait far below the timeout
            sock.sendall(bytes([byte]))
            sent.append(byte)
            time.sleep(0.02)

    with RawUpstream(trickle) as upstream:
        config = replace(CONFIG, login_url=upstream.url, timeout=0.3)
        err = flow_error(demo.exchange_code, demo.new_opener(NO_PROXY), config, CODE)
    assert (err.status, err.step) == (HTTPStatus.GATEWAY_TIMEOUT, demo.STEP_TOKEN)
    assert len(sent) < len(body)  # the app hung up before the reply was complete


# ---------------------------------------------------------------------------
# End of the steps: they stand alone
# ---------------------------------------------------------------------------

def the_steps(path: Any) -> Any:
    """The module as the README says to copy only the steps: all above "# End of the steps"."""
    lines = pathlib.Path(MODULE).read_text(encoding="utf-8").splitlines(keepends=True)
    end = next(n for n, line in enumerate(lines) if line.startswith("# End of the steps"))
    path.write_text("".join(lines[:end]), encoding="utf-8")
    return path


def unused_and_undefined(source: str) -> tuple[set[str], set[str]]:
    """The names a module imports but never uses, and those it uses but never defines: in
    its code (as the compiler sees it) and in its annotations (as a type checker does)."""
    table = symtable.symtable(source, "module", "exec")
    defined = {symbol.get_name() for symbol in table.get_symbols()
               if symbol.is_assigned() or symbol.is_imported()} | set(dir(builtins))
    imported = {symbol.get_name() for symbol in table.get_symbols() if symbol.is_imported()}
    tree = ast.parse(source)
    annotations = [node.annotation for node in ast.walk(tree)
                   if isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation] + [
        node.returns for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns]
    in_annotations = {name.id for annotation in annotations for name in ast.walk(annotation)
                      if isinstance(name, ast.Name)}
    in_code: set[str] = set()

    def visit(scope: symtable.SymbolTable) -> None:
        in_code.update(symbol.get_name() for symbol in scope.get_symbols()
                       if symbol.is_referenced() and (scope is table or symbol.is_global()))
        for child in scope.get_children():
            visit(child)

    visit(table)
    used = in_code | in_annotations
    return imported - used - {"annotations"}, used - defined


def test_the_steps_copied_alone_import_what_they_use_and_need_nothing_below_them(
        tmp_path: Any, mailchimp: FakeMailchimp, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = the_steps(tmp_path / "mailchimp_oauth_demo.py")
    source = steps.read_text(encoding="utf-8")
    assert unused_and_undefined(source) == (set(), set())
    spec = importlib.util.spec_from_file_location("mailchimp_oauth_demo", steps)
    assert spec is not None and spec.loader is not None
    copied = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mailchimp_oauth_demo", copied)  # the README imports it
    spec.loader.exec_module(copied)
    assert set(copied.__all__) <= set(vars(copied))
    assert doctest.testmod(copied).failed == 0
    [example] = readme_examples()
    names: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), names)  # noqa: S102 -- our own README
    names["opener"] = mailchimp
    session: dict[str, str] = {}
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
        names["start_login"](session)).query))["state"]
    assert names["finish_login"](session, "user-1", f"code={CODE}&state={state}")[0] == 303
    assert names["database"] == {"user-1": (TOKEN, "us19")}


def test_the_module_docstrings_example_runs() -> None:
    assert doctest.testmod(demo).attempted >= 4 and doctest.testmod(demo).failed == 0


# ---------------------------------------------------------------------------
# The app: logins in progress
# ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SESSION_A, SESSION_B = "a" * 43, "b" * 43


def test_a_state_is_random_enough_and_url_safe() -> None:
    logins = demo.PendingLogins()
    states = {logins.start(SESSION_A) for _ in range(5)}
    assert len(states) == 5 and all(demo.SESSION_ID.fullmatch(state) for state in states)


def test_a_state_is_taken_once_by_the_browser_that_started_it() -> None:
    logins = demo.PendingLogins()
    state = logins.start(SESSION_A)
    assert logins.take(SESSION_B, state) == ""
    assert logins.take(SESSION_A, state) == state
    assert logins.take(SESSION_A, state) == ""


def test_two_tabs_of_one_browser_can_each_finish_their_login() -> None:
    logins = demo.PendingLogins()
    first, second = logins.start(SESSION_A), logins.start(SESSION_A)
    assert (logins.take(SESSION_A, second), logins.take(SESSION_A, first)) == (second, first)


def test_a_state_expires_after_its_lifetime(clock: Clock) -> None:
    logins = demo.PendingLogins(lifetime=600, clock=clock)
    state = logins.start(SESSION_A)
    clock.now += 601
    assert logins.take(SESSION_A, state) == ""


@pytest.mark.parametrize("state", ["", "caf\u00e9", "x" * 60_000])
def test_a_state_of_any_shape_is_refused_not_an_error(state: str) -> None:
    logins = demo.PendingLogins()
    logins.start(SESSION_A)
    assert logins.take(SESSION_A, state) == ""


def test_pending_logins_stay_bounded_dropping_the_oldest() -> None:
    logins = demo.PendingLogins(browsers=3, per_browser=2)
    oldest = logins.start("0" * 43)
    for n in range(1, 4):
        logins.start(str(n) * 43)
    tabs = [logins.start(SESSION_A) for _ in range(3)]
    assert logins.take("0" * 43, oldest) == ""  # the fourth browser pushed out the first
    assert logins.take(SESSION_A, tabs[0]) == ""  # a third tab pushed out the first
    assert logins.take(SESSION_A, tabs[2]) == tabs[2]


# ---------------------------------------------------------------------------
# The app, on the real server on a free port, with a scripted Mailchimp
# ---------------------------------------------------------------------------

@dataclass
class Page:
    status: int
    headers: email.message.Message
    text: str
    url: str

    def query(self) -> dict[str, str]:
        location = self.headers["Location"]
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))


def origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def form_origin(page: Page, target: str) -> str:
    """The Origin a browser sends with a form POST from page to target, as the page's own
    Referrer-Policy decides (Fetch standard, "append a request Origin header")."""
    policy = page.headers.get("Referrer-Policy", "strict-origin-when-cross-origin")
    downgrade = page.url.startswith("https:") and target.startswith("http:")
    if policy == "no-referrer" or (policy == "same-origin" and origin(page.url) != origin(target)) \
            or (downgrade and policy in ("strict-origin", "strict-origin-when-cross-origin",
                                         "no-referrer-when-downgrade")):
        return "null"
    return origin(page.url)


def fetch_site(page_url: str, target: str) -> str:
    """Sec-Fetch-Site for a request from page_url to target (a site ignores the port)."""
    if origin(page_url) == origin(target):
        return "same-origin"
    here, there = urllib.parse.urlsplit(page_url), urllib.parse.urlsplit(target)
    same_site = (here.scheme, here.hostname) == (there.scheme, there.hostname)
    return "same-site" if same_site else "cross-site"


def foreign_page(url: str, referrer_policy: str = "") -> Page:
    """A page of another site, with a form that posts to the app."""
    headers = email.message.Message()
    if referrer_policy:
        headers["Referrer-Policy"] = referrer_policy
    return Page(HTTPStatus.OK, headers, "", url)


class Forms(html.parser.HTMLParser):
    """A page's forms, as a browser submits them: action -> hidden fields."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, str]] = {}
        self.action = ""
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "form":
            self.action = named["action"] or ""
            self.forms[self.action] = {}
        if tag == "input" and named.get("type") == "hidden":
            self.forms[self.action][named["name"] or ""] = named["value"] or ""


class Browser:
    """Just enough of a browser: one cookie jar for 127.0.0.1 (whatever the port, as browsers
    keep them), sent with every request but another site's POST (SameSite=Lax), follows
    nothing, one connection a request."""

    def __init__(self, port: int, address: str = "", tls: ssl.SSLContext | None = None) -> None:
        self.origin = address or f"{'https' if tls else 'http'}://127.0.0.1:{port}"  # address:
        self.port, self.tls = port, tls  # as a TLS proxy in front of the app shows it
        self.cookies: dict[str, str] = {}

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, cookies: bool = True) -> Page:
        url = urllib.parse.urljoin(self.origin, target)
        parts = urllib.parse.urlsplit(url)
        host, port = ("127.0.0.1", self.port) if origin(url) == self.origin else (
            parts.hostname, parts.port)
        assert host == "127.0.0.1" and port, f"left loopback: {target}"
        connection = http.client.HTTPSConnection(host, port, timeout=10, context=self.tls) \
            if self.tls else http.client.HTTPConnection(host, port, timeout=10)
        sent = dict(headers or {})
        if self.cookies and cookies:
            sent["Cookie"] = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                           body=body, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
        connection.close()
        for cookie in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = cookie.partition("=")
            self.cookies[name] = rest.split(";")[0]
            if "; Max-Age=0" in cookie:
                del self.cookies[name]
        return Page(response.status, response.headers, text, url)

    def get(self, target: str, **headers: str) -> Page:
        return self.request("GET", target, headers=headers)

    def submit(self, page: Page, action: str, fields: dict[str, str] | None = None, *,
               sends: str = "everything") -> Page:
        """Press a button on page whose form posts to action, with the headers a browser
        sends: "everything" as Chromium, Firefox and Safari 16.4+ do, "origin" as older
        Safari (no Sec-Fetch-*), "nothing" as browsers older still."""
        target = urllib.parse.urljoin(page.url, action)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if sends in ("everything", "origin"):
            headers["Origin"] = form_origin(page, target)
        if sends == "everything":
            headers.update({"Sec-Fetch-Site": fetch_site(page.url, target),
                            "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document",
                            "Sec-Fetch-User": "?1"})
        cross_site = fetch_site(page.url, target) == "cross-site"  # Lax: the cookie stays home
        return self.request("POST", target, urllib.parse.urlencode(fields or {}).encode(),
                            headers, cookies=not cross_site)

    def press(self, action: str, sends: str = "everything") -> Page:
        """Open the start page and press its button for action (Ping again, Disconnect)."""
        page = self.get("/")
        forms = Forms(page.text).forms
        assert action in forms, "no such button"
        return self.submit(page, action, forms[action], sends=sends)

    def follow(self, page: Page) -> Page:
        """Where a redirect leads, as a browser goes there: a GET."""
        assert page.status in (HTTPStatus.FOUND, HTTPStatus.SEE_OTHER), page.status
        return self.get(page.headers["Location"])

    def start_login(self) -> str:
        """Step 2, as the browser sees it; returns the state Mailchimp would send back."""
        return self.get("/auth/mailchimp").query()["state"]

    def callback(self, **params: str) -> Page:
        return self.get(f"{demo.CALLBACK_PATH}?{urllib.parse.urlencode(params)}")

    def connect(self) -> Page:
        """Steps 2 to 7 with Mailchimp approving."""
        return self.callback(code=CODE, state=self.start_login())


def post_form(url: str, fields: dict[str, str]) -> Page:
    """A server-to-server form POST, as the app's token request is."""
    return Browser(0).request("POST", url, urllib.parse.urlencode(fields).encode(),
                              {"Content-Type": "application/x-www-form-urlencoded"})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@contextlib.contextmanager
def serving(server: demo.Server) -> Iterator[demo.Server]:
    """Run a server in a thread for the length of a test."""
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.stop(5)
        thread.join()


@pytest.fixture
def server(mailchimp: FakeMailchimp, clock: Clock) -> Iterator[demo.Server]:
    config = demo.Config(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    server, _ = demo.make_server(config, port=0, opener=mailchimp, request_timeout=0.5,
                                 logins=demo.PendingLogins(clock=clock))
    with serving(server):
        yield server


@pytest.fixture
def browser(server: demo.Server) -> Browser:
    return Browser(server.server_port)


def warnings_in(log: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in log.records if record.levelno == logging.WARNING]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="mailchimp_oauth_demo")
    return caplog


def redirect_uri(server: demo.Server) -> str:
    return f"http://127.0.0.1:{server.server_port}{demo.CALLBACK_PATH}"


def test_index_links_to_the_login(browser: Browser) -> None:
    page = browser.get("/")
    assert page.status == HTTPStatus.OK
    assert 'href="/auth/mailchimp"' in page.text


def test_login_redirects_to_mailchimp_with_a_state_bound_to_a_session_cookie(
        browser: Browser, server: demo.Server) -> None:
    page = browser.get("/auth/mailchimp")
    assert page.status == HTTPStatus.FOUND
    assert page.headers["Location"].startswith("https://login.mailchimp.com/oauth2/authorize?")
    assert page.query()["redirect_uri"] == redirect_uri(server)
    assert len(page.query()["state"]) >= 43  # 256 bits, url-safe base64
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith(demo.SESSION_COOKIE + "=")
    assert "; HttpOnly" in cookie and "; SameSite=Lax" in cookie


def test_the_whole_flow_connects_and_shows_the_result(
        browser: Browser, server: demo.Server, mailchimp: FakeMailchimp) -> None:
    page = browser.connect()
    assert (page.status, page.headers["Location"]) == (HTTPStatus.SEE_OTHER, "/")
    assert CODE not in page.headers["Location"]  # RFC 6749 §3.1.2.5: the code leaves the URL
    result = browser.get("/")
    assert "Freddie&#x27;s Jokes" in result.text and "us19" in result.text
    assert "Everything&#x27;s Chimpy!" in result.text
    assert demo.mask(TOKEN) in result.text and TOKEN not in result.text
    assert mailchimp.urls() == [TOKEN_URL, METADATA_URL, PING_URL]


def test_the_server_sends_its_own_redirect_uri_and_the_browsers_code(
        browser: Browser, server: demo.Server, mailchimp: FakeMailchimp) -> None:
    browser.connect()  # port 0: the address the server really bound, as in steps 2 and 4
    assert mailchimp.sent[0].form["redirect_uri"] == [redirect_uri(server)]
    assert mailchimp.sent[0].form["code"] == [CODE]


def test_another_browser_sees_the_start_page_not_the_connection(
        browser: Browser, server: demo.Server) -> None:
    browser.connect()
    stranger = Browser(server.server_port)
    assert "Connect with Mailchimp" in stranger.get("/").text


def test_two_tabs_started_in_one_browser_both_connect(browser: Browser) -> None:
    first, second = browser.start_login(), browser.start_login()
    assert browser.callback(code=CODE, state=second).status == HTTPStatus.SEE_OTHER
    assert browser.callback(code=CODE, state=first).status == HTTPStatus.SEE_OTHER


def test_login_rotates_the_session_cookie(browser: Browser, server: demo.Server) -> None:
    browser.start_login()
    before = dict(browser.cookies)
    browser.connect()
    assert browser.cookies[demo.SESSION_COOKIE] != before[demo.SESSION_COOKIE]
    planted = Browser(server.server_port)  # whoever knew the old id
    planted.cookies = before
    assert "Connect with Mailchimp" in planted.get("/").text


def test_the_session_cookie_is_secure_when_the_app_is_served_over_https(
        mailchimp: FakeMailchimp) -> None:
    config = demo.Config(CLIENT_ID, CLIENT_SECRET, base_url="https://demo.example")
    server, _ = demo.make_server(config, port=0, opener=mailchimp)
    with serving(server):
        cookie = Browser(server.server_port).get("/auth/mailchimp").headers["Set-Cookie"]
    assert cookie.endswith("; Secure")


def test_the_session_cookie_is_not_secure_on_plain_http(browser: Browser) -> None:
    assert "Secure" not in browser.get("/auth/mailchimp").headers["Set-Cookie"]


def test_the_connected_page_offers_ping_again_and_disconnect_as_buttons(
        browser: Browser) -> None:
    browser.connect()
    page = browser.get("/")
    forms = Forms(page.text).forms
    assert forms == {"/ping": {"do": "ping"}, "/disconnect": {"do": "disconnect"}}  # lynx
    # sends a form without fields as a GET: with one, it posts it as every browser does
    assert "Last ping</dt><dd>" in page.text and "<code>us19</code>" in page.text


def test_ping_again_uses_the_kept_token_and_the_page_shows_the_fresh_result(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    browser.connect()
    mailchimp.sent.clear()
    mailchimp.replies[PING_URL] = (200, {"health_status": "Still Chimpy"})
    page = browser.press("/ping")
    assert (page.status, page.headers["Location"]) == (HTTPStatus.SEE_OTHER, "/")
    assert [(sent.url, sent.headers["Authorization"]) for sent in mailchimp.sent] == [
        (PING_URL, f"Bearer {TOKEN}")]
    assert ": Still Chimpy</dd>" in browser.get("/").text


def test_ping_again_after_the_user_revoked_access_says_so_and_forgets_the_token(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    browser.connect()
    mailchimp.replies[PING_URL] = (401, {"title": "API Key Invalid", "detail": "Revoked."})
    page = browser.press("/ping")
    assert page.status == HTTPStatus.BAD_GATEWAY
    assert "removed the app" in page.text and "forgotten" in page.text
    assert "Connect with Mailchimp" in browser.get("/").text


def test_ping_again_that_fails_otherwise_keeps_the_connection(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    browser.connect()
    mailchimp.replies[PING_URL] = (503, {"title": "Service Unavailable"})
    assert browser.press("/ping").status == HTTPStatus.BAD_GATEWAY
    assert "Connected to Mailchimp" in browser.get("/").text


def test_ping_again_without_a_connection_goes_to_the_start_page(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    page = browser.submit(browser.get("/"), "/ping")
    assert (page.status, page.headers["Location"]) == (HTTPStatus.SEE_OTHER, "/")
    assert mailchimp.sent == []


def test_disconnect_forgets_the_connection_and_explains_revoking(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    browser.connect()
    sent = len(mailchimp.sent)
    pressed = browser.press("/disconnect")
    assert (pressed.status, pressed.headers["Location"]) == (HTTPStatus.SEE_OTHER,
                                                             "/disconnected")  # reloads: GET
    assert "Max-Age=0" in pressed.headers["Set-Cookie"]
    page = browser.follow(pressed)
    assert page.status == HTTPStatus.OK and "remove the app in your Mailchimp account" in page.text
    assert "Connect with Mailchimp" in browser.get("/").text
    assert len(mailchimp.sent) == sent  # nothing to tell Mailchimp: it has no revocation


def test_our_pages_let_the_browser_send_our_origin_with_their_forms(browser: Browser) -> None:
    page = browser.get("/")  # the Origin follows from the page's own Referrer-Policy
    assert form_origin(page, f"{browser.origin}/disconnect") == browser.origin
    assert form_origin(page, "https://other.example/") == "null"  # and nothing for others


@pytest.mark.parametrize("action", ["/ping", "/disconnect"])
@pytest.mark.parametrize("sends", ["everything", "origin", "nothing"])
def test_the_buttons_work_in_every_browser(browser: Browser, mailchimp: FakeMailchimp,
                                           action: str, sends: str) -> None:
    browser.connect()
    mailchimp.replies[PING_URL] = (200, {"health_status": "Pinged again"})
    assert browser.press(action, sends=sends).status == HTTPStatus.SEE_OTHER
    after = browser.get("/").text
    assert ("Pinged again" in after) if action == "/ping" else ("Connect with" in after)


@pytest.mark.parametrize("action", ["/ping", "/disconnect"])
@pytest.mark.parametrize("url, policy, sends", [
    ("http://127.0.0.1:9999/", "", "everything"),  # same site, other port: SameSite lets it by
    ("https://evil.example/", "", "everything"),
    ("http://evil.example/", "", "origin"),  # a browser without Sec-Fetch-*
    ("http://evil.example/", "no-referrer", "origin"),  # Origin: null
    ("http://evil.example/", "no-referrer", "everything"),
])
def test_the_buttons_pressed_on_another_site_change_nothing(
        browser: Browser, mailchimp: FakeMailchimp, action: str, url: str, policy: str,
        sends: str) -> None:
    browser.connect()
    sent = len(mailchimp.sent)
    page = browser.submit(foreign_page(url, policy), urllib.parse.urljoin(browser.origin, action),
                          sends=sends)
    assert page.status == HTTPStatus.FORBIDDEN and "another site" in page.text
    assert "Connected to Mailchimp" in browser.get("/").text
    assert len(mailchimp.sent) == sent  # and nothing went to Mailchimp


@pytest.mark.parametrize("origin, fetch_site", [
    ("http://127.0.0.1:3000", "cross-site"),  # Sec-Fetch-Site alone says no ...
    ("", "same-site"),  # ... and here too, where no Origin came
    ("http://127.0.0.1:3001", ""),  # Origin alone says no
    ("null", "same-origin"),
])
def test_each_half_of_the_same_origin_check_refuses_on_its_own(
        open_store: Callable[..., demo.Store], origin: str, fetch_site: str) -> None:
    app = demo.OAuthDemo(CONFIG, opener=FakeMailchimp(), store=open_store(),
                         logins=demo.PendingLogins())
    visit = demo.Visit("/ping", origin=origin, fetch_site=fetch_site)
    assert flow_error(app.check_same_origin, visit, "ping again").status == HTTPStatus.FORBIDDEN


@pytest.mark.parametrize("action", ["/ping", "/disconnect"])
def test_get_on_a_button_changes_nothing(browser: Browser, mailchimp: FakeMailchimp,
                                         action: str) -> None:
    browser.connect()
    sent = len(mailchimp.sent)
    page = browser.get(action)
    assert (page.status, page.headers["Allow"]) == (HTTPStatus.METHOD_NOT_ALLOWED, "POST")
    assert "Connected to Mailchimp" in browser.get("/").text and len(mailchimp.sent) == sent


def test_a_restart_with_the_same_store_keeps_the_user_connected(
        mailchimp: FakeMailchimp, tmp_path: Any, log: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "store.db")
    config = demo.Config(CLIENT_ID, CLIENT_SECRET)
    first, _ = demo.make_server(config, port=0, opener=mailchimp, store=demo.Store(path))
    with serving(first):
        browser = Browser(first.server_port)
        browser.connect()
    assert f"kept its token and server prefix in {path}," in log.text
    second, _ = demo.make_server(config, port=0, opener=mailchimp, store=demo.Store(path))
    with serving(second):
        browser.origin, browser.port = second.origin, second.server_port
        assert "Freddie&#x27;s Jokes" in browser.get("/").text
        assert browser.press("/ping").status == HTTPStatus.SEE_OTHER


def test_parallel_logins_are_all_kept(mailchimp: FakeMailchimp, tmp_path: Any) -> None:
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp,
                                 store=demo.Store(str(tmp_path / "store.db")))
    with serving(server):
        browsers = [Browser(server.server_port) for _ in range(20)]
        threads = [threading.Thread(target=browser.connect) for browser in browsers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all("Connected to Mailchimp" in browser.get("/").text for browser in browsers)
    assert len(rows(tmp_path / "store.db")) == 20


def test_a_store_locked_too_long_gives_503_keeps_nothing_and_the_server_lives_on(
        mailchimp: FakeMailchimp, tmp_path: Any, log: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "store.db"
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp,
                                 store=demo.Store(str(path), busy_timeout=0.05))
    with serving(server):
        browser = Browser(server.server_port)
        with locked(path):
            page = browser.connect()
        assert page.status == HTTPStatus.SERVICE_UNAVAILABLE
        assert "keeping the connection" in page.text and "locked" in page.text
        assert "Connect with Mailchimp" in browser.get("/").text
    assert rows(path) == []
    assert any("-> 503 Step 7" in record.getMessage() for record in log.records)


# --- step 3: the callback is checked before anything goes upstream ---------

@pytest.mark.parametrize("params", [{"code": CODE}, {"code": CODE, "state": "x" * 43},
                                    {"state": "THE STATE"}])
def test_a_callback_the_steps_refuse_gets_its_page_and_sends_nothing_upstream(
        browser: Browser, mailchimp: FakeMailchimp, params: dict[str, str]) -> None:
    state = browser.start_login()
    page = browser.callback(**{name: value.replace("THE STATE", state)
                               for name, value in params.items()})
    assert page.status == HTTPStatus.BAD_REQUEST and "Step 3 (callback) failed" in page.text
    assert mailchimp.sent == []


def test_a_state_works_once_in_its_own_browser_within_its_lifetime(
        browser: Browser, server: demo.Server, mailchimp: FakeMailchimp, clock: Clock) -> None:
    state = browser.start_login()
    attacker = Browser(server.server_port)
    attacker.start_login()  # has a session of its own, just not the one this state belongs to
    assert attacker.callback(code=CODE, state=state).status == HTTPStatus.BAD_REQUEST
    assert Browser(server.server_port).callback(code=CODE, state=state).status == 400
    assert mailchimp.sent == []
    assert browser.callback(code=CODE, state=state).status == HTTPStatus.SEE_OTHER
    assert browser.callback(code=CODE, state=state).status == HTTPStatus.BAD_REQUEST  # replayed
    late = browser.start_login()
    clock.now += demo.LOGIN_LIFETIME + 1
    assert browser.callback(code=CODE, state=late).status == HTTPStatus.BAD_REQUEST
    assert len(mailchimp.sent) == 3  # one flow's worth


def test_deny_shows_a_friendly_page_with_mailchimps_words_escaped(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    page = browser.callback(state=browser.start_login(), error="access_denied",
                            error_description=f"User said no {SCRIPT}")
    assert page.status == HTTPStatus.FORBIDDEN
    assert heading_and_status(page) == ("Access not granted", "403 Forbidden")
    assert "Access was not granted" in page.text
    assert "&lt;script&gt;" in page.text and SCRIPT not in page.text
    assert mailchimp.sent == []


def heading_and_status(page: Page) -> tuple[str, str]:
    """What a problem page says first, and the status it shows beneath, smaller."""
    [heading] = re.findall(r"<h1>(.*?)</h1>", page.text)
    [status] = re.findall(r'<p class="status">(.*?)</p>', page.text)
    return heading, status


def test_an_authorization_error_other_than_deny_names_the_setting_as_the_user_sets_it(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    page = browser.callback(state=browser.start_login(), error="unauthorized_client")
    assert page.status == HTTPStatus.BAD_GATEWAY and "unauthorized_client" in page.text
    assert "MAILCHIMP_CLIENT_ID" in page.text and "Config.client_id" not in page.text
    assert mailchimp.sent == []


# --- steps 4 to 6: every way Mailchimp's reply can be unusable --------------

@pytest.mark.parametrize("scripted", [
    (401, {"error": "invalid_client", "error_description": f"Client auth failed {SCRIPT}"}),
    (500, b"<html><h1>Internal Server Error</h1>" + SCRIPT.encode() + b"</html>"),
])
def test_unusable_token_reply_gives_502_and_stops_the_flow(
        browser: Browser, mailchimp: FakeMailchimp, scripted: tuple[int, Any]) -> None:
    mailchimp.replies[TOKEN_URL] = scripted
    page = browser.connect()
    assert page.status == HTTPStatus.BAD_GATEWAY and "Step 4 (token exchange)" in page.text
    assert SCRIPT not in page.text
    assert mailchimp.urls() == [TOKEN_URL]


def test_bad_server_prefix_gives_502_and_the_token_goes_nowhere(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[METADATA_URL] = (200, {**METADATA, "dc": "evil.example.com/x#"})
    page = browser.connect()
    assert page.status == HTTPStatus.BAD_GATEWAY and "Step 5 (metadata)" in page.text
    assert mailchimp.urls() == [TOKEN_URL, METADATA_URL]


def test_ping_problem_gives_502_quoting_the_problem_escaped(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[PING_URL] = (503, {"type": "about:blank", "title": "Service Unavailable",
                                         "detail": f"Down for maintenance {SCRIPT}"})
    page = browser.connect()
    assert page.status == HTTPStatus.BAD_GATEWAY and "Step 6 (ping)" in page.text
    assert "Service Unavailable" in page.text and SCRIPT not in page.text


def test_ping_with_markup_in_the_health_status_shows_it_as_text(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[PING_URL] = (200, {"health_status": f"Chimpy {SCRIPT}"})
    browser.connect()
    page = browser.get("/")
    assert "Chimpy &lt;script&gt;" in page.text and SCRIPT not in page.text


def test_upstream_timeout_gives_504_and_the_server_keeps_serving(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[METADATA_URL] = TimeoutError("timed out")
    page = browser.connect()
    assert page.status == HTTPStatus.GATEWAY_TIMEOUT
    assert heading_and_status(page) == ("Mailchimp did not answer in time", "504 Gateway Timeout")
    assert "did not answer within 10 s" in page.text
    assert browser.get("/").status == HTTPStatus.OK


def test_a_failed_flow_leaves_the_browser_unconnected(browser: Browser,
                                                      mailchimp: FakeMailchimp) -> None:
    mailchimp.replies[PING_URL] = (500, b"")
    browser.connect()
    assert "Connect with Mailchimp" in browser.get("/").text


# --- what reaches the log ---------------------------------------------------

def test_the_log_never_holds_the_secret_token_code_or_query(
        browser: Browser, mailchimp: FakeMailchimp, log: pytest.LogCaptureFixture) -> None:
    state = browser.start_login()
    browser.callback(code=CODE, state=state)
    browser.callback(code=CODE, state=state)  # a refused replay logs too
    mailchimp.replies[TOKEN_URL] = (401, {"error": "invalid_client"})
    browser.connect()
    text = "\n".join(record.getMessage() for record in log.records)
    assert "/oauth/mailchimp/callback -> 303" in text
    for secret in (CLIENT_SECRET, TOKEN, CODE, state, "code=", "state="):
        assert secret not in text


def test_each_failure_logs_one_warning_naming_the_step(
        browser: Browser, mailchimp: FakeMailchimp, log: pytest.LogCaptureFixture) -> None:
    mailchimp.replies[TOKEN_URL] = (401, {"error": "invalid_client"})
    browser.connect()
    warnings = warnings_in(log)
    assert len(warnings) == 1
    assert "-> 502 Step 4 (token exchange) failed: Mailchimp answered 401" in warnings[0]


# --- narration: each step, as it happens -----------------------------------

def step_lines(log: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in log.records
            if record.getMessage().startswith("step ") and record.levelno == logging.INFO]


def test_a_login_narrates_each_step_once_in_order(
        browser: Browser, log: pytest.LogCaptureFixture) -> None:
    browser.connect()
    assert [line[:6] for line in step_lines(log)] == [
        "step 2", "step 3", "step 4", "step 5", "step 6", "step 7"]


def test_the_narration_says_what_went_where_with_status_and_time(
        browser: Browser, log: pytest.LogCaptureFixture) -> None:
    browser.connect()
    lines = dict(line.split(": ", 1) for line in step_lines(log))
    assert "https://login.mailchimp.com/oauth2/authorize" in lines[demo.STEP_AUTHORIZE]
    assert lines[demo.STEP_TOKEN].startswith(f"POST {TOKEN_URL} -> 200 in ")
    assert lines[demo.STEP_METADATA].startswith(f"GET {METADATA_URL} -> 200 in ")
    assert "server prefix us19" in lines[demo.STEP_METADATA]
    assert lines[demo.STEP_PING].startswith(f"GET {PING_URL} -> 200 in ")
    assert "Everything's Chimpy!" in lines[demo.STEP_PING]
    assert "kept its token and server prefix in memory" in lines[demo.STEP_KEEP]


def test_the_narration_shows_secrets_masked_or_not_at_all(
        browser: Browser, log: pytest.LogCaptureFixture) -> None:
    state = browser.start_login()
    browser.callback(code=CODE, state=state)
    text = "\n".join(step_lines(log))
    for secret in (CLIENT_SECRET, TOKEN, CODE, state):
        assert secret not in text
    assert demo.mask(TOKEN) in text and demo.mask(CODE) in text and demo.mask(state) in text


@pytest.mark.parametrize("url, scripted, step, hint", [
    (TOKEN_URL, (401, {"error": "invalid_client"}), "Step 4", "rotated"),
    (TOKEN_URL, (400, {"error": "invalid_grant"}), "Step 4", "redirect URI"),
    (TOKEN_URL, (400, {"error": "invalid_request"}), "Step 4", "not JSON"),
    (TOKEN_URL, urllib.error.URLError(OSError(-2, "Name or service not known")), "Step 4",
     "internet connection"),
    (TOKEN_URL, TimeoutError("timed out"), "Step 4", "--timeout"),
    (METADATA_URL, (200, {**METADATA, "dc": "evil.example/x#"}), "Step 5", "went nowhere"),
    (METADATA_URL, (401, {"error": "invalid_token"}), "Step 5", "OAuth <token>"),
    (PING_URL, (401, {"title": "API Key Invalid"}), "Step 6", "removed the app"),
    (PING_URL, (503, {"title": "Service Unavailable"}), "Step 6", "try again"),
    (PING_URL, (200, b"pong"), "Step 6", "not what its guide describes"),
])
def test_each_failure_line_names_its_step_and_the_likely_cause(
        browser: Browser, mailchimp: FakeMailchimp, log: pytest.LogCaptureFixture,
        url: str, scripted: Any, step: str, hint: str) -> None:
    mailchimp.replies[url] = scripted
    browser.connect()
    [warning] = warnings_in(log)
    assert f"{step} (" in warning and "failed" in warning
    assert "Hint: " in warning and hint in warning.split("Hint: ")[1]


@pytest.mark.parametrize("query, says", [
    ("code=x", "has no state"), ("code=x&state=" + "y" * 43, "Start again"),
    ("state=" + "y" * 43 + "&state=z", "Start again"),
])
def test_a_refused_callback_line_names_step_3_and_what_to_do(
        browser: Browser, log: pytest.LogCaptureFixture, query: str, says: str) -> None:
    browser.start_login()
    browser.get(f"{demo.CALLBACK_PATH}?{query}")
    [warning] = warnings_in(log)
    assert "Step 3 (callback) failed" in warning and says in warning


class BrokenStore(demo.Store):
    def load(self, session: str) -> demo.Connection | None:
        raise RuntimeError("a bug")


def test_a_bug_gives_a_plain_500_page_a_logged_traceback_and_the_server_lives_on(
        mailchimp: FakeMailchimp, log: pytest.LogCaptureFixture) -> None:
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp, store=BrokenStore())
    with serving(server):
        browser = Browser(server.server_port)
        browser.start_login()  # so the browser has a session for the broken store to load
        page = browser.get("/")
        assert page.status == HTTPStatus.INTERNAL_SERVER_ERROR
        assert "Traceback" not in page.text and "a bug" not in page.text
        assert browser.get("/auth/mailchimp").status == HTTPStatus.FOUND
    [error] = [record for record in log.records if record.levelno == logging.ERROR]
    assert "bug while answering GET /" in error.getMessage() and error.exc_info


# ---------------------------------------------------------------------------
# The store: step 7's connections
# ---------------------------------------------------------------------------

CONNECTION = demo.Connection(TOKEN, "us19", "Freddie's Jokes", "2026-11-29 08:00:00 UTC",
                             "2026-11-29 08:00:00 UTC", "Everything's Chimpy!")
DAY = 24 * 3600.0


@pytest.fixture
def open_store() -> Iterator[Callable[..., demo.Store]]:
    """demo.Store(path, ...) for a test, closed when it ends."""
    opened: list[demo.Store] = []

    def open_(path: Any = ":memory:", **options: Any) -> demo.Store:
        opened.append(demo.Store(str(path), **options))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


def test_a_connection_never_shows_its_token_in_its_repr() -> None:
    assert TOKEN not in repr(CONNECTION)


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_store_saves_loads_and_deletes(where: str, tmp_path: Any,
                                         open_store: Callable[..., demo.Store]) -> None:
    store = open_store(tmp_path / "s.db") if where == "file" else open_store()
    store.save(SESSION_A, CONNECTION)
    assert store.load(SESSION_A) == CONNECTION and store.load(SESSION_B) is None
    store.delete(SESSION_A)
    assert store.load(SESSION_A) is None


def test_a_file_store_survives_a_restart(tmp_path: Any,
                                         open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    with contextlib.closing(demo.Store(str(path))) as first_run:
        first_run.save(SESSION_A, CONNECTION)
    assert open_store(path).load(SESSION_A) == CONNECTION


def rows(path: Any) -> list[tuple[Any, ...]]:
    """What the store file holds, read as anyone would, with the standard library."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT session, server_prefix FROM connections").fetchall()


def test_a_file_store_is_one_table_anyone_can_read_with_sqlite3(
        tmp_path: Any, open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    open_store(path).save(SESSION_A, CONNECTION)
    assert rows(path) == [(SESSION_A, "us19")]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_file_store_and_its_journal_are_readable_by_their_owner_only(
        tmp_path: Any, open_store: Callable[..., demo.Store]) -> None:
    open_store(tmp_path / "store.db").save(SESSION_A, CONNECTION)
    modes = {entry.name: entry.stat().st_mode & 0o777 for entry in tmp_path.iterdir()}
    assert "store.db-wal" in modes and set(modes.values()) == {0o600}


def test_two_processes_sharing_a_store_keep_all_their_logins(
        tmp_path: Any, open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    first, second = open_store(path), open_store(path)  # two connections, as two processes
    sessions = [f"{n:043d}" for n in range(40)]
    threads = [threading.Thread(target=(first, second)[n % 2].save, args=(session, CONNECTION))
               for n, session in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(session for session, _ in rows(path)) == sessions


def test_two_processes_opening_a_new_store_together_both_start(tmp_path: Any) -> None:
    failures: list[BaseException] = []

    def open_and_close(path: str, start: threading.Barrier) -> None:
        start.wait()
        try:
            demo.Store(path).close()
        except demo.StoreError as err:  # "another program's database", "database is locked"
            failures.append(err)

    for pair in range(40):  # SQLite locks connections in one process as it locks processes
        start = threading.Barrier(2)
        path = str(tmp_path / f"new-{pair}.db")
        openers = [threading.Thread(target=open_and_close, args=(path, start))
                   for _ in range(2)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
    assert failures == []


def test_a_ping_is_recorded_only_while_the_connection_is_there(
        open_store: Callable[..., demo.Store]) -> None:
    store = open_store()
    store.save(SESSION_A, CONNECTION)
    assert store.record_ping(SESSION_A, "2026-11-30 09:00:00 UTC", "Still Chimpy")
    assert store.load(SESSION_A) == replace(CONNECTION, pinged_at="2026-11-30 09:00:00 UTC",
                                            health_status="Still Chimpy")
    store.delete(SESSION_A)
    assert not store.record_ping(SESSION_A, "2026-11-30 09:01:00 UTC", "Still Chimpy")
    assert store.load(SESSION_A) is None  # a late ping does not bring a Disconnect back


def test_a_connection_unused_for_its_lifetime_expires(
        tmp_path: Any, clock: Clock, open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    store = open_store(path, clock=clock)
    store.save(SESSION_A, CONNECTION)
    store.save(SESSION_B, CONNECTION)
    clock.now += 29 * DAY
    store.record_ping(SESSION_B, "later", "Chimpy")  # using a connection keeps it
    clock.now += 2 * DAY
    assert store.load(SESSION_A) is None and store.load(SESSION_B) is not None
    assert len(rows(path)) == 2  # expired, but still in the file
    open_store(path, clock=clock)  # start-up deletes what has expired
    assert [session for session, _ in rows(path)] == [SESSION_B]


def test_expired_connections_leave_the_file_when_a_new_one_is_saved(
        tmp_path: Any, clock: Clock, open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    store = open_store(path, clock=clock)
    store.save(SESSION_A, CONNECTION)
    clock.now += 31 * DAY
    store.save(SESSION_B, CONNECTION)  # a login, long after: no restart needed
    assert [session for session, _ in rows(path)] == [SESSION_B]


def test_the_session_cookie_lasts_as_long_as_the_store_keeps_its_connection() -> None:
    cookie = demo.session_cookie(SESSION_A, secure=False)
    assert f"; Max-Age={demo.SESSION_LIFETIME}" in cookie and demo.SESSION_LIFETIME == 30 * DAY


def other_schema(path: Any) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()


def newer_version(path: Any) -> None:
    with contextlib.closing(demo.Store(str(path))) as store:
        store.save(SESSION_A, CONNECTION)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 2")


def filled(path: Any) -> None:
    """A store of 300 connections, all of them in the file itself (none in a -wal)."""
    with contextlib.closing(demo.Store(str(path))) as store:
        for n in range(300):
            store.save(f"{n:043d}", CONNECTION)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def truncated(path: Any) -> None:
    filled(path)
    path.write_bytes(path.read_bytes()[:20_000])


def damaged(path: Any) -> None:
    """A page in the middle overwritten, the header whole: only a check of the pages
    themselves (quick_check) finds it before a request does."""
    filled(path)
    data = bytearray(path.read_bytes())
    data[10 * 4096:10 * 4096 + 200] = b"\xff" * 200  # the 11th of 24 pages of 4 KiB
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make", [
    lambda path: path.write_bytes(b"not a database, just some text\n" * 10),
    lambda path: path.write_bytes(b'{"version": 1, "connections": {}}'),  # the old JSON store
    truncated, damaged, other_schema, newer_version,
], ids=["garbage", "json-store", "truncated", "damaged", "other-schema", "newer-version"])
def test_a_file_that_is_not_this_apps_store_is_refused_and_left_untouched(
        tmp_path: Any, make: Any) -> None:
    path = tmp_path / "store.db"
    make(path)
    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(demo.StoreError, match="not a store this app can use.*left as it is"):
        demo.Store(str(path))
    assert path.read_bytes() == before


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("name", ["store.db", "store.db-wal", "store.db-shm"])
def test_a_store_file_others_can_read_is_refused_and_left_untouched(
        tmp_path: Any, name: str) -> None:
    with contextlib.closing(demo.Store(str(tmp_path / "store.db"))) as store:
        store.save(SESSION_A, CONNECTION)
    exposed = tmp_path / name
    exposed.write_bytes(exposed.read_bytes() if exposed.exists() else b"")  # as another user's
    exposed.chmod(0o666)  # program may leave a -wal or -shm beside a store in /tmp
    before = {entry.name: entry.read_bytes() for entry in tmp_path.iterdir()}
    with pytest.raises(demo.StoreError, match=f"{name} holds access tokens.*chmod 600"):
        demo.Store(str(tmp_path / "store.db"))
    assert {entry.name: entry.read_bytes() for entry in tmp_path.iterdir()} == before
    assert exposed.stat().st_mode & 0o777 == 0o666


@pytest.mark.skipif(os.name != "posix", reason="file owners are POSIX")
@pytest.mark.parametrize("owner, mode, says", [
    (0, 0o600, ""), (0, 0o640, "other users can read"), (0, 0o602, "other users can read"),
    (1, 0o600, "another user owns it"), (1, 0o644, "another user owns it"),
])
def test_a_file_is_the_users_alone_only_if_they_own_it_and_no_one_else_may_touch_it(
        owner: int, mode: int, says: str) -> None:
    uid = os.geteuid() + owner  # 1: someone else
    info = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, 0, 4096, 0, 0, 0))
    problem = demo.exposure("/tmp/store.db", info)
    assert (says in problem and problem != "") if says else problem == ""


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_an_empty_store_file_of_ours_is_taken_and_made_ours_alone(
        tmp_path: Any, open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "connections.db"
    path.touch(0o644)  # as `touch`, or sqlite3.connect() before the app ever ran
    open_store(path).save(SESSION_A, CONNECTION)
    assert path.stat().st_mode & 0o777 == 0o600 and rows(path) == [(SESSION_A, "us19")]


@pytest.mark.skipif(os.name != "posix", reason="symbolic links need POSIX here")
def test_a_store_path_that_is_a_symbolic_link_is_refused(tmp_path: Any) -> None:
    (tmp_path / "elsewhere.db").symlink_to(tmp_path / "real.db")
    with pytest.raises(demo.StoreError, match="is a symbolic link: give --store the file"):
        demo.Store(str(tmp_path / "elsewhere.db"))
    assert not (tmp_path / "real.db").exists()


def test_a_store_path_that_is_not_a_file_is_refused(tmp_path: Any) -> None:
    with pytest.raises(demo.StoreError, match="cannot open"):
        demo.Store(str(tmp_path))


@contextlib.contextmanager
def locked(path: Any) -> Iterator[None]:
    """Another process holding the store's write lock."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")


def test_a_store_locked_by_another_process_stops_start_up_after_the_busy_timeout(
        tmp_path: Any, open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    open_store(path).save(SESSION_A, CONNECTION)
    with locked(path), pytest.raises(demo.StoreError, match="locked"):
        demo.Store(str(path), busy_timeout=0.05)
    assert open_store(path).load(SESSION_A) == CONNECTION


@pytest.mark.parametrize("column, value", [("server_prefix", "evil.example/x#"),
                                           ("access_token", "a b\r\nc"), ("account_name", b"\x00")])
def test_a_tampered_row_is_refused_not_used(tmp_path: Any, column: str, value: Any,
                                            open_store: Callable[..., demo.Store]) -> None:
    path = tmp_path / "store.db"
    store = open_store(path)
    store.save(SESSION_A, CONNECTION)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"UPDATE connections SET {column} = ?", (value,))
        db.commit()
    with pytest.raises(demo.StoreError, match="impossible"):
        store.load(SESSION_A)


# ---------------------------------------------------------------------------
# Serving HTTP, and the limits on what a request may do
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/", "/auth/mailchimp", f"{demo.CALLBACK_PATH}?state=x",
                                    "/nowhere", "/%00"])
def test_every_response_carries_the_safety_headers(browser: Browser, target: str) -> None:
    page = browser.get(target)
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Content-Length"] == str(len(page.text.encode()))
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_the_policy_allows_exactly_the_stylesheet_the_page_carries(browser: Browser) -> None:
    page = browser.get("/")
    [style] = re.findall(r"<style>(.*?)</style>", page.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    policy = page.headers["Content-Security-Policy"]
    assert f"style-src 'sha256-{digest}';" in policy and "script-src" not in policy


def test_unknown_path_is_404(browser: Browser) -> None:
    page = browser.get("/admin")
    assert page.status == HTTPStatus.NOT_FOUND
    assert heading_and_status(page) == ("There is no page here", "404 Not Found")


def test_the_icon_browsers_ask_for_is_no_content_and_no_warning(
        browser: Browser, log: pytest.LogCaptureFixture) -> None:
    page = browser.get("/favicon.ico")  # Firefox asks on every page
    assert page.status == HTTPStatus.NO_CONTENT and page.text == ""
    assert "Content-Length" not in page.headers  # RFC 9110 §8.6
    assert warnings_in(log) == []


@pytest.mark.parametrize("target", ["/", "/nowhere", "/disconnected", f"{demo.CALLBACK_PATH}?x=1"])
def test_every_page_is_one_main_landmark_under_its_heading(browser: Browser, target: str) -> None:
    body = browser.get(target).text.partition("<body>")[2]
    assert body.strip().startswith("<main>") and body.count("<main>") == 1
    assert body.strip().endswith("</main>\n</body>\n</html>")


def test_head_answers_like_get_without_a_body(browser: Browser, server: demo.Server) -> None:
    get = browser.get("/")
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        sock.sendall(with_port(b"HEAD / HTTP/1.1\r\n" + AS_CURL + b"\r\n" + GET,
                               server.server_port))  # the GET right behind it
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"Content-Length: {get.headers['Content-Length']}\r\n".encode() in head
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")  # no body came between the two


def test_head_neither_starts_nor_finishes_a_login(browser: Browser,
                                                 mailchimp: FakeMailchimp) -> None:
    head = browser.request("HEAD", "/auth/mailchimp")
    assert (head.status, head.headers["Allow"]) == (HTTPStatus.METHOD_NOT_ALLOWED, "GET")
    assert "Set-Cookie" not in head.headers
    state = browser.start_login()
    head = browser.request("HEAD", f"{demo.CALLBACK_PATH}?code={CODE}&state={state}")
    assert head.status == HTTPStatus.METHOD_NOT_ALLOWED and mailchimp.sent == []
    assert browser.callback(code=CODE, state=state).status == HTTPStatus.SEE_OTHER


def test_expect_100_continue_is_answered_before_the_body_is_sent(server: demo.Server) -> None:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        sock.sendall(with_port(b"POST /disconnect HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
                               b"Expect: 100-continue\r\n"
                               b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Content-Length: 3\r\n\r\n", server.server_port))
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body
        sock.sendall(b"a=1")
        assert sock.recv(65536).startswith(b"HTTP/1.1 303 ")


@pytest.mark.parametrize("name", ["localhost", "[::1]", "127.0.0.2", "LocalHost"])
def test_another_loopback_name_is_sent_to_the_base_url_before_the_login_starts(
        browser: Browser, server: demo.Server, name: str) -> None:
    for path in ("/", "/auth/mailchimp"):
        page = browser.get(path, Host=f"{name}:{server.server_port}")
        assert (page.status, page.headers["Location"]) == (HTTPStatus.FOUND,
                                                           server.origin + path)
        assert "Set-Cookie" not in page.headers


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:1", "localhost",
                                  "10.0.0.7:{port}", "[::1]:1"])
def test_an_address_or_localhost_on_another_port_is_served_where_it_is(
        browser: Browser, server: demo.Server, host: str) -> None:
    page = browser.get("/", Host=host.format(port=server.server_port))  # as a proxy may send
    assert page.status == HTTPStatus.OK and "Location" not in page.headers


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "EVIL.example"])
def test_a_name_that_is_not_the_apps_gets_421_and_no_login(
        browser: Browser, server: demo.Server, host: str) -> None:
    for path in ("/", "/auth/mailchimp"):  # DNS rebinding: the attacker's name, our address
        page = browser.get(path, Host=host.format(port=server.server_port))
        assert page.status == HTTPStatus.MISDIRECTED_REQUEST
        assert "Set-Cookie" not in page.headers and "Location" not in page.headers
    assert browser.get("/").status == HTTPStatus.OK


def test_the_base_urls_own_name_is_served(mailchimp: FakeMailchimp) -> None:
    config = demo.Config(CLIENT_ID, CLIENT_SECRET, base_url="https://demo.example")
    server, _ = demo.make_server(config, port=0, opener=mailchimp)
    with serving(server):
        browser = Browser(server.server_port)
        assert browser.get("/", Host="Demo.Example").status == HTTPStatus.OK
        assert browser.get("/", Host="other.example").status == HTTPStatus.MISDIRECTED_REQUEST


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nHost: evil.example\r\n\r\n",  # which?
    b"GET / HTTP/1.1\r\nHost: \r\n\r\n", b"GET / HTTP/1.1\r\nHost: localhost:x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
])
def test_a_missing_repeated_or_malformed_host_is_400(server: demo.Server, head: bytes) -> None:
    answer = raw_exchange(server.server_port, head)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1


def test_http_1_0_may_leave_out_host_and_keep_its_connection_alive(server: demo.Server) -> None:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        for _ in range(2):  # the second request rides the same connection
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: keep-alive" in head
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            assert len(read_exactly(sock, length)) == length


# Made for these tests with `openssl req -x509 -newkey ec ... -subj /CN=127.0.0.1 -addext
# subjectAltName=IP:127.0.0.1,DNS:localhost -days 36500`: trusted by nothing but these tests.
CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUIgsbxAi5wncacUk02qiG6+rOn7IwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTIwMjAxMjA1MloYDzIxMjYxMTA4
MDEyMDUyWjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAATfxWoPAmETQ5IcqKwkBnqsFei7X1yfrV3B43frz6BCsYY06L6sY0Hq
+dJgdMi452b3vr79+mjUi0F5cHpPH3jWo28wbTAdBgNVHQ4EFgQUX9nXbqgL+IaJ
MDWORXXLkScl1D8wHwYDVR0jBBgwFoAUX9nXbqgL+IaJMDWORXXLkScl1D8wDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARhwR/AAABgglsb2NhbGhvc3QwCgYIKoZI
zj0EAwIDSAAwRQIgXMrUSUxNFKIVZTYRrWvACUnmf2nk4fl+u4i+Vp6NPZoCIQCD
IqNx862JklxtF9mCNcOoogO+EufAP0ctbXAg3uFNsg==
-----END CERTIFICATE-----
"""
KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglkZHPuWbvuhN5+Tk
F6BwaaISbWy8jil3bDjm2B98mp+hRANCAATfxWoPAmETQ5IcqKwkBnqsFei7X1yf
rV3B43frz6BCsYY06L6sY0Hq+dJgdMi452b3vr79+mjUi0F5cHpPH3jW
-----END PRIVATE KEY-----
"""


@pytest.fixture
def certificate(tmp_path: Any) -> tuple[str, str]:
    (tmp_path / "cert.pem").write_text(CERT_PEM)
    (tmp_path / "key.pem").write_text(KEY_PEM)
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")


def trusting_our_certificate() -> ssl.SSLContext:
    """A client's TLS settings, as a browser's after the user trusts the local certificate."""
    return ssl.create_default_context(cadata=CERT_PEM)


def test_with_a_certificate_the_app_speaks_https_with_secure_cookies(
        mailchimp: FakeMailchimp, certificate: tuple[str, str]) -> None:
    tls = demo.tls_context(*certificate)
    server, app = demo.make_server(demo.Config(CLIENT_ID, CLIENT_SECRET), port=0,
                                   opener=mailchimp, tls=tls)
    assert app.config.redirect_uri == f"https://127.0.0.1:{server.server_port}{demo.CALLBACK_PATH}"
    with serving(server):
        browser = Browser(server.server_port, tls=trusting_our_certificate())
        login = browser.get("/auth/mailchimp")
        assert "; Secure" in login.headers["Set-Cookie"]
        state = login.query()["state"]
        assert browser.callback(code=CODE, state=state).status == HTTPStatus.SEE_OTHER
        assert browser.press("/ping").status == HTTPStatus.SEE_OTHER  # its Origin is https://
        assert "Connected to Mailchimp" in browser.get("/").text
        assert mailchimp.sent[0].form["redirect_uri"] == [app.config.redirect_uri]
        answer = raw_exchange(server.server_port, GET)  # plain HTTP to the TLS port
        assert not answer.startswith(b"HTTP/")  # no page, no cookie
        assert browser.get("/").status == HTTPStatus.OK


@pytest.mark.parametrize("args, says", [
    (["--tls-cert", "CERT"], "go together"), (["--tls-key", "KEY"], "go together"),
    (["--tls-cert", "KEY", "--tls-key", "KEY"], "cannot use --tls-cert"),
    (["--tls-cert", "CERT", "--tls-key", "/nonexistent/key.pem"], "cannot use --tls-cert"),
])
def test_tls_options_that_cannot_work_are_one_line_and_exit_status_2(
        certificate: tuple[str, str], args: list[str], says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    args = [{"CERT": certificate[0], "KEY": certificate[1]}.get(arg, arg) for arg in args]
    assert demo.main(["--port", "0", *args], environ=ENV) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_startup_with_tls_prints_https_addresses(certificate: tuple[str, str]) -> None:
    with running("--port", "0", "--tls-cert", certificate[0], "--tls-key", certificate[1],
                 env=ENV) as run:
        assert run.banner[1].split()[-1].startswith("https://127.0.0.1:")
        assert run.banner[2].split()[-1].startswith("https://127.0.0.1:")
        assert Browser(run.port, tls=trusting_our_certificate()).get("/").status == HTTPStatus.OK


def test_behind_a_tls_proxy_no_host_is_redirected(mailchimp: FakeMailchimp) -> None:
    config = demo.Config(CLIENT_ID, CLIENT_SECRET, base_url="https://demo.example")
    server, _ = demo.make_server(config, port=0, opener=mailchimp)
    with serving(server):
        assert Browser(server.server_port).get("/", Host="localhost").status == HTTPStatus.OK


def test_a_base_url_written_oddly_still_accepts_its_own_pages_buttons(
        mailchimp: FakeMailchimp) -> None:
    config = demo.config_from_env(ENV, base_url="https://Demo.Example:443")
    server, _ = demo.make_server(config, port=0, opener=mailchimp)
    with serving(server):
        browser = Browser(server.server_port, "https://demo.example")  # through a TLS proxy
        browser.connect()
        assert browser.press("/disconnect").status == HTTPStatus.SEE_OTHER
        assert "Connect with Mailchimp" in browser.get("/").text


def test_post_to_a_page_is_405_naming_the_allowed_methods(browser: Browser) -> None:
    page = browser.request("POST", "/")
    assert page.status == HTTPStatus.METHOD_NOT_ALLOWED
    assert page.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "BREW"])
def test_other_methods_are_refused_cleanly(browser: Browser, method: str) -> None:
    page = browser.request(method, "/")
    assert page.status == HTTPStatus.NOT_IMPLEMENTED and "Traceback" not in page.text


def eventually(check: Callable[[], bool]) -> bool:
    """Whether check() comes true within 10 s: for what the server's threads do in their
    own time."""
    deadline = time.monotonic() + 10
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


AS_CURL = b"Host: 127.0.0.1:PORT\r\n"  # what curl, like every HTTP/1.1 client, sends


def with_port(data: bytes, port: int) -> bytes:
    """Raw request bytes with PORT made the server's: "Host: 127.0.0.1:PORT", as curl sends."""
    return data.replace(b"PORT", str(port).encode())


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, say that's all, and read until the server closes (or 10 s pass). A
    server that answers and closes with some of them unread makes the kernel reset the
    connection: sending or shutting down may then fail, but the answer can still be read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(ConnectionError):  # EPIPE, ECONNRESET: it stopped reading
            sock.sendall(with_port(data, port))
        with contextlib.suppress(OSError):  # ENOTCONN: it has reset already
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # after the answer
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def read_head(sock: socket.socket) -> bytes:
    """An answer's status line and headers, read from a kept-alive connection."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed after {head!r}"
        head += byte
    return head


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


@pytest.mark.parametrize("request_bytes", [
    b"GET /oauth/mailchimp/callback?" + b"a" * 60_000 + b" HTTP/1.1\r\n" + AS_CURL + b"\r\n",
    b"GET /oauth/mailchimp/callback?state=%ZZ%&code=%%% HTTP/1.1\r\n" + AS_CURL + b"\r\n",
    b"GET /oauth/mailchimp/callback?state=a&state=b&code=c&code=d HTTP/1.1\r\n" + AS_CURL
    + b"\r\n",
    (b"GET /oauth/mailchimp/callback?code=x%0D%0ALocation:%20http://evil&state=a%0D%0A"
     b" HTTP/1.1\r\n" + AS_CURL + b"\r\n"),
    b"GET / HTTP/1.1\r\nCookie: " + demo.SESSION_COOKIE.encode() + b"=\r\nSet-Cookie: x\r\n\r\n",
    b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-Header: y\r\n" * 120 + b"\r\n",
    b"GET / HTTP/1.1\r\n" + AS_CURL + b"Content-Length: 5\r\n\r\nGET /",
])
def test_hostile_requests_get_a_clean_answer_and_the_server_keeps_serving(
        browser: Browser, server: demo.Server, request_bytes: bytes) -> None:
    answer = raw_exchange(server.server_port, request_bytes)
    head = answer.partition(b"\r\n\r\n")[0]
    assert answer.startswith(b"HTTP/1.1 ")
    assert b"Traceback" not in answer and b"evil" not in head and b"Set-Cookie: x" not in head
    assert b"Content-Security-Policy:" in head
    assert browser.get("/").status == HTTPStatus.OK


@pytest.mark.parametrize("line", [
    b"GET @evil.example/ HTTP/1.1",  # as Location, http://127.0.0.1:PORT@evil.example/
    b"GET 1/ HTTP/1.1", b"GET http://evil.example/ HTTP/1.1", b"OPTIONS * HTTP/1.1",
    b"GET /\x00 HTTP/1.1", b"GET /\x1b[2K HTTP/1.1", b"GET /caf\xc3\xa9 HTTP/1.1",
    b"GET\xa0/ HTTP/1.1", b"GET /\x85HTTP/1.1", b"GET  / HTTP/1.1", b"GET / HTTP/1.1 extra",
    b"GET\t/ HTTP/1.1", b"GET /", b"GET / HTTP/1.10",
    b"X\x1b[2K\x1b[1G21:00:00 INFO step 4 (token exchange): ok / HTTP/1.1",  # a fake log line
    b"GET /\r HTTP/1.1",  # a bare CR
])
def test_a_request_line_that_is_not_method_path_version_is_400(
        server: demo.Server, log: pytest.LogCaptureFixture, line: bytes) -> None:
    answer = raw_exchange(server.server_port, line + b"\r\nHost: localhost:PORT\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Location" not in answer
    assert not [record for record in log.records if not record.getMessage().isprintable()]


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: LENGTH\r\n", 200),  # read as this request's body
    (b"Content-Length: LENGTH \r\n", 200),  # RFC 9110 §5.5: the space is not part of the value
    (b"Transfer-Encoding: chunked\r\n", 400),
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: 0\r\nContent-Length: LENGTH\r\n", 400),  # which one?
    (b"Content-Length : 44\r\n", 400),  # a space before the colon
    (b"X-No-Colon\r\nContent-Length: LENGTH\r\n", 400),  # the parser would stop at this line
    (b"X-Folded: a\r\n b\r\n", 400),  # obsolete line folding
    (b"\rContent-Length: LENGTH\r\n", 400),  # Python's parser ends the head at a bare CR
    (b"X-A: 1\rContent-Length: LENGTH\r\n", 400),  # ... or starts a hidden header there
    (b"Content-Length: 99999999\r\n", 413),  # too big to read: refused, the connection closed
])
def test_a_request_body_is_never_read_as_the_next_request(server: demo.Server,
                                                          headers: bytes, status: int) -> None:
    second = with_port(b"GET /auth/mailchimp HTTP/1.1\r\n" + AS_CURL + b"\r\n",
                       server.server_port)
    headers = headers.replace(b"LENGTH", str(len(second)).encode())  # the second, as a body
    answer = raw_exchange(server.server_port,
                          b"GET / HTTP/1.1\r\n" + AS_CURL + headers + b"\r\n" + second)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert answer.count(b"HTTP/1.1 ") == 1 and b"302" not in answer


def test_a_body_cut_short_runs_no_route(server: demo.Server, log: pytest.LogCaptureFixture,
                                        browser: Browser) -> None:
    browser.connect()
    cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    answer = raw_exchange(server.server_port, b"POST /disconnect HTTP/1.1\r\n" + AS_CURL
                          + f"Cookie: {cookie}\r\n".encode()
                          + b"Content-Length: 10\r\n\r\na=1")  # 3 of 10 bytes, then gone
    assert answer == b""  # nobody to answer, and nothing done
    assert eventually(lambda: any("hung up mid-body" in r.getMessage() for r in log.records))
    assert "Connected to Mailchimp" in browser.get("/").text


def test_a_body_over_the_limit_is_refused_without_inviting_it(mailchimp: FakeMailchimp) -> None:
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp, request_timeout=30)
    with serving(server), socket.create_connection(("127.0.0.1", server.server_port),
                                                   timeout=5) as sock:
        sock.sendall(with_port(b"POST /disconnect HTTP/1.1\r\n" + AS_CURL
                               + b"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n",
                               server.server_port))
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head  # no 100
        assert b"Set-Cookie" not in head  # the route (which would forget the session) never ran
        while sock.recv(65536):  # the page, then the close, with the body never sent
            pass


def test_a_request_head_over_the_cap_gets_431(server: demo.Server) -> None:
    head = b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 1000 + b"\r\n"
    answer = raw_exchange(server.server_port, head * 40 + b"\r\n")  # 40 KiB, 40 lines
    assert answer.startswith(b"HTTP/1.1 431 ") and b"Connection: close" in answer


@pytest.mark.parametrize("buffer_size", [io.DEFAULT_BUFFER_SIZE, 3000])  # 3000: unaligned
def test_reading_a_huge_head_stops_at_the_cap(buffer_size: int) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        flood = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 80  # 80 KB of headers, no end
        theirs.sendall(flood)
        stream = demo.RequestInput(ours, 10)
        stream.expect_request()
        with pytest.raises(demo.BadHead) as refused:
            http.client.parse_headers(demo.RequestReader(stream, buffer_size))
        ours.setblocking(False)
        left = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := ours.recv(65536):
                left += chunk
    assert refused.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    assert len(flood) - len(left) == demo.MAX_HEAD_BYTES  # read up to the cap, not a byte more


def test_a_client_trickling_its_head_is_cut_off_at_the_deadline(
        mailchimp: FakeMailchimp) -> None:
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp, request_timeout=0.5)
    with serving(server), socket.create_connection(("127.0.0.1", server.server_port),
                                                   timeout=10) as sock:
        for sent, byte in enumerate(b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 200):
            sock.sendall(bytes([byte]))  # one byte every 50 ms, each well inside the timeout
            if select.select([sock], [], [], 0.05)[0]:
                break
        assert sock.recv(1) == b"" and sent < 100  # closed after ~0.5 s, head still unfinished


def test_one_kept_alive_connection_carries_every_kind_of_response(server: demo.Server) -> None:
    requests = [b"GET / HTTP/1.1", b"HEAD / HTTP/1.1", b"GET /auth/mailchimp HTTP/1.1",
                b"GET /nowhere HTTP/1.1", b"POST / HTTP/1.1\r\nContent-Length: 3",
                f"GET {demo.CALLBACK_PATH}?state=x HTTP/1.1".encode(), b"GET / HTTP/1.1"]
    statuses, bodies = [], []
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        for request in requests:  # one after another, on one TCP connection
            sock.sendall(with_port(request + b"\r\n" + AS_CURL + b"\r\n", server.server_port)
                         + (b"a=1" if request.startswith(b"POST") else b""))
            head = read_head(sock)  # bytes left over from the last answer would start it
            assert b"Connection: close" not in head, f"{request!r} closed the connection"
            statuses.append(int(head.split()[1]))
            length = 0 if request.startswith(b"HEAD") else int(
                re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            bodies.append(read_exactly(sock, length))
    assert statuses == [200, 200, 302, 404, 405, 400, 200]
    assert bodies[0] == bodies[6] and bodies[0].endswith(b"</html>\n")


def test_an_idle_kept_alive_connection_is_closed(server: demo.Server) -> None:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        sock.sendall(with_port(b"GET / HTTP/1.1\r\n" + AS_CURL + b"\r\n", server.server_port))
        received = b""
        while chunk := sock.recv(65536):  # the page, then b"" once the idle timeout closes it
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"</html>\n")


def test_a_client_that_sends_nothing_is_let_go(server: demo.Server) -> None:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        assert sock.recv(1) == b""  # closed by the server's idle timeout, not by ours


@contextlib.contextmanager
def connections_to(server: demo.Server) -> Iterator[Callable[[bytes], socket.socket]]:
    """open(data): a new connection to server that has sent data; all closed at the end."""
    with contextlib.ExitStack() as stack:
        def open_(data: bytes) -> socket.socket:
            sock = stack.enter_context(socket.create_connection(
                ("127.0.0.1", server.server_port), timeout=10))
            sock.sendall(with_port(data, server.server_port))
            return sock
        yield open_


GET = b"GET / HTTP/1.1\r\n" + AS_CURL + b"\r\n"
HEAD_IN_BODY_TO_COME = (b"POST /disconnect HTTP/1.1\r\n" + AS_CURL + b"Expect: 100-continue\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\n"
                        b"Content-Length: 3\r\n\r\n")


def test_at_the_connection_cap_new_connections_wait_and_the_log_says_so_once(
        mailchimp: FakeMailchimp, log: pytest.LogCaptureFixture) -> None:
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp, max_connections=4,
                                 request_timeout=30)
    with serving(server), connections_to(server) as open_:
        held = [open_(HEAD_IN_BODY_TO_COME) for _ in range(4)]
        assert all(read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n" for sock in held)
        waiting = open_(GET)  # the cap is reached, by requests whose heads are in
        assert select.select([waiting], [], [], 1.5)[0] == []  # past every wait of the server's
        held[0].sendall(b"a=1")
        assert held[0].recv(12) == b"HTTP/1.1 303"  # never cut off, however long it waited
        held[0].close()
        assert waiting.recv(12) == b"HTTP/1.1 200"  # it took the freed place
        held[1].close()
        held[2].close()
        assert eventually(lambda: len(warnings_in(log)) == 2)  # 4 - 2: down to half
        more = [open_(GET) for _ in range(2)]
        assert all(sock.recv(12) == b"HTTP/1.1 200" for sock in more)
        assert eventually(lambda: len(warnings_in(log)) == 3)
        warnings = warnings_in(log)
    assert warnings == ["serving 4 connections, the most it will; new ones wait",
                                "down to 2 connections",
                                "serving 4 connections, the most it will; new ones wait"]


def test_at_the_cap_the_slowest_unfinished_head_makes_way_for_a_newcomer(
        mailchimp: FakeMailchimp, log: pytest.LogCaptureFixture) -> None:
    server, _ = demo.make_server(CONFIG, port=0, opener=mailchimp, max_connections=4,
                                 request_timeout=30)
    with serving(server), connections_to(server) as open_:
        slowest = open_(b"GET / HTTP/1.1\r\nX-Slow: a")  # a slowloris, one byte at a time
        began = time.monotonic()

        def reading_heads(count: int) -> bool:
            return sum(handler.input.head_waiting_since() < math.inf
                       for handler in list(server.handlers)) == count

        assert eventually(lambda: reading_heads(1))  # its head began to arrive first
        slow = [open_(b"GET / HTTP/1.1\r\nX-Slow: a") for _ in range(3)]
        assert eventually(lambda: reading_heads(4))
        visitors = [open_(GET) for _ in range(2)]
        assert all(sock.recv(12) == b"HTTP/1.1 200" for sock in visitors)  # after about 1 s
        assert slowest.recv(1) == b""  # cut off, with one of the others
        assert time.monotonic() - began >= 1  # but not before its head was a second late
        assert sum(select.select([sock], [], [], 0)[0] != [] for sock in slow) == 1
    cutting = [line for line in warnings_in(log) if "cutting off" in line]
    assert cutting == ["cutting off the slowest unfinished requests to let new connections in"]


@pytest.mark.parametrize("gone", [
    ConnectionResetError(104, "Connection reset by peer"),  # it reset
    BrokenPipeError(32, "Broken pipe"),  # it closed before its answer was written
    socket.timeout("timed out"),  # noqa: UP041 -- Python 3.9's: it stopped reading the answer
], ids=["reset", "broken-pipe", "timeout"])
def test_a_client_that_goes_away_costs_one_debug_line_and_no_traceback(
        server: demo.Server, log: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], gone: OSError) -> None:
    try:
        raise gone
    except OSError:
        server.handle_error(None, ("127.0.0.9", 1234))
    assert capsys.readouterr().err == ""
    [line] = [record for record in log.records if "127.0.0.9" in record.getMessage()]
    assert line.levelno == logging.DEBUG and "went away" in line.getMessage()


def test_a_stop_waits_for_a_request_being_answered_only_until_its_deadline(
        server: demo.Server) -> None:
    class Answering:  # a handler whose answer never ends
        answering = True

    server.handlers.add(Answering())  # type: ignore[arg-type]
    finished: list[bool] = []
    stop = threading.Thread(target=lambda: finished.append(server.finish_requests(0.1)),
                            daemon=True)  # a stop that never gives up must not hang the suite
    stop.start()
    stop.join(10)
    server.handlers.clear()
    assert finished == [False]  # it gave up, and said so


def test_a_bug_outside_the_routes_still_logs_its_traceback(
        server: demo.Server, log: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("a bug")
    except ValueError:
        server.handle_error(None, ("127.0.0.9", 1234))
    [line] = [record for record in log.records if "127.0.0.9" in record.getMessage()]
    assert line.levelno == logging.ERROR and line.exc_info


@pytest.mark.parametrize("linger", [struct.pack("ii", 1, 0), None], ids=["reset", "close"])
def test_clients_that_go_away_mid_request_cost_a_debug_line_each(
        browser: Browser, server: demo.Server, log: pytest.LogCaptureFixture,
        linger: bytes | None) -> None:
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
            sock.sendall(with_port(b"GET / HTTP/1.1\r\n" + AS_CURL + b"X-Unfinished: ",
                                   server.server_port))
            if linger:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)  # close = reset
    assert browser.get("/").status == HTTPStatus.OK

    def gone() -> list[logging.LogRecord]:
        return [record for record in log.records
                if re.search("went away|hung up", record.getMessage())]

    assert eventually(lambda: len(gone()) == 10)  # each noticed in its own thread
    assert all(record.levelno == logging.DEBUG for record in gone())
    assert not [record for record in log.records if record.levelno >= logging.WARNING]


def test_a_disconnect_while_a_ping_is_on_its_way_stays_done(
        browser: Browser, mailchimp: FakeMailchimp) -> None:
    browser.connect()
    page = browser.get("/")
    pinging, disconnected = threading.Event(), threading.Event()

    def hold_the_ping(url: str) -> None:
        if url == PING_URL:
            pinging.set()
            disconnected.wait(10)

    mailchimp.before = hold_the_ping
    answers: list[Page] = []
    ping = threading.Thread(target=lambda: answers.append(browser.submit(page, "/ping")))
    ping.start()
    assert pinging.wait(10)
    assert browser.submit(page, "/disconnect").status == HTTPStatus.SEE_OTHER
    disconnected.set()
    ping.join()
    assert answers[0].status == HTTPStatus.SEE_OTHER and "Set-Cookie" not in answers[0].headers
    assert "Connect with Mailchimp" in browser.get("/").text


# ---------------------------------------------------------------------------
# The command line: settings from the environment, start-up, stop
# ---------------------------------------------------------------------------
ENV = {"MAILCHIMP_CLIENT_ID": CLIENT_ID, "MAILCHIMP_CLIENT_SECRET": CLIENT_SECRET}


@pytest.mark.parametrize("missing", ["MAILCHIMP_CLIENT_ID", "MAILCHIMP_CLIENT_SECRET"])
def test_config_names_the_missing_variable(missing: str) -> None:
    environ = {name: value for name, value in ENV.items() if name != missing}
    with pytest.raises(demo.ConfigError, match=missing):
        demo.config_from_env(environ)


def test_config_defaults_to_mailchimp() -> None:
    config = demo.config_from_env(ENV)
    assert (config.login_url, config.api_url) == (demo.LOGIN_URL, demo.API_URL)


@pytest.mark.parametrize("url", [
    "https://login.mailchimp.com", "http://127.0.0.1:8080", "http://127.9.9.9",
    "http://[::1]:8080", "http://localhost:9000/",
])
def test_config_accepts_https_anywhere_and_http_on_loopback(url: str) -> None:
    config = demo.config_from_env({**ENV, "MAILCHIMP_LOGIN_URL": url})
    assert config.login_url == url.rstrip("/")


@pytest.mark.parametrize("url", [
    "http://login.mailchimp.com", "http://10.0.0.1", "http://127.0.0.1.nip.io",
    "http://localhost.evil.example", "ftp://127.0.0.1", "http://[::ffff:8.8.8.8]",
    "https://login.mailchimp.com?x=1", "https://user@login.mailchimp.com", "https://:99",
    "http://127.0.0.1:99999",
])
def test_config_refuses_plain_http_beyond_this_machine(url: str) -> None:
    with pytest.raises(demo.ConfigError, match="MAILCHIMP_LOGIN_URL"):
        demo.config_from_env({**ENV, "MAILCHIMP_LOGIN_URL": url})


@pytest.mark.parametrize("url", ["http://us19.api.mailchimp.com/3.0", "http://{dc}.example/3.0",
                                 "https://api.example/3.0"])
def test_config_refuses_an_api_url_without_https_or_a_place_for_the_prefix(url: str) -> None:
    with pytest.raises(demo.ConfigError, match="MAILCHIMP_API_URL") as refused:
        demo.config_from_env({**ENV, "MAILCHIMP_API_URL": url})
    assert "{dc}" in str(refused.value)  # the value as typed, or the rule about it


MODULE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mailchimp_oauth_demo.py")


@dataclass
class Run:
    """The module run as a user runs it: its banner, then (once stopped) what it printed."""

    process: subprocess.Popen[str]
    banner: list[str]
    out: str = ""
    err: str = ""

    @property
    def port(self) -> int:
        """The port it listens on: the browsers' address's, unless it says another."""
        listening = [line for line in self.banner if line.startswith("  listening on:")]
        address = re.search(r"https?://\S+:(\d+)/", (listening or self.banner[1:2])[0])
        assert address, self.banner
        return int(address[1])


@contextlib.contextmanager
def running(*args: str, env: dict[str, str], module: str = MODULE) -> Iterator[Run]:
    """python MODULE ARGS, with env as its only MAILCHIMP_* settings, until the block ends."""
    clean = {name: value for name, value in os.environ.items()  # a proxy would not find
             if not name.startswith("MAILCHIMP") and "proxy" not in name.lower()}  # loopback
    process = subprocess.Popen([sys.executable, module, *args], env={**clean, **env}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(20, process.kill)  # a silent process can't hang the suite
    watchdog.start()
    assert process.stdout is not None
    banner = [process.stdout.readline()]
    while not banner[-1].startswith("  connections kept in:") and banner[-1]:
        banner.append(process.stdout.readline())
    if "--sandbox" in args:
        banner.append(process.stdout.readline())  # the SANDBOX notice
    run = Run(process, banner)
    try:
        yield run
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.terminate()
        run.out, run.err = process.communicate(timeout=10)


class HeldMailchimp:
    """An upstream whose token endpoint holds its answer until the test lets it go."""

    def __init__(self) -> None:
        self.arrived, self.go = threading.Event(), threading.Event()

    def respond(self, method: str, visit: demo.Visit) -> demo.Response:
        if visit.path == "/oauth2/token":
            self.arrived.set()
            self.go.wait(10)
            return demo.json_response(HTTPStatus.OK, {"access_token": TOKEN, "expires_in": 0})
        if visit.path == "/oauth2/metadata":
            return demo.json_response(HTTPStatus.OK, METADATA)
        return demo.json_response(HTTPStatus.OK, {"health_status": "Everything's Chimpy!"})

    def close(self) -> None:
        self.go.set()


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM is POSIX")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl+C"])
def test_a_stop_lets_a_login_in_flight_finish_then_exits_0(stop: signal.Signals) -> None:
    held = HeldMailchimp()
    upstream = demo.Server(("127.0.0.1", 0))
    upstream.app = held
    upstream_env = {"MAILCHIMP_LOGIN_URL": upstream.origin,
                    "MAILCHIMP_API_URL": upstream.origin + "/{dc}/3.0"}
    with serving(upstream), running("--port", "0", env={**ENV, **upstream_env}) as run:
        browser = Browser(run.port)
        state = browser.start_login()
        answers: list[Page] = []
        login = threading.Thread(
            target=lambda: answers.append(browser.callback(code=CODE, state=state)))
        login.start()
        assert held.arrived.wait(10)  # the login is in flight, at step 4
        run.process.send_signal(stop)
        assert run.process.stdout is not None
        assert run.process.stdout.readline().startswith("stopping")
        with pytest.raises(ConnectionRefusedError):  # no new connection once a stop begins
            socket.create_connection(("127.0.0.1", run.port), timeout=10)
        held.go.set()
        login.join()
        run.process.wait(timeout=10)
    assert run.process.returncode == 0 and run.out.strip() == "stopped"
    assert answers[0].status == HTTPStatus.SEE_OTHER  # the login completed


def test_startup_says_where_it_listens_when_browsers_use_another_address() -> None:
    with running("--port", "0", "--base-url", "http://localhost:3000", env=ENV) as run:
        assert run.banner[1].split()[-1] == "http://localhost:3000/"  # as given, for browsers
        assert run.port != 3000  # what --port 0 picked, said on a line of its own
        assert Browser(run.port).get("/", Host="localhost:3000").status == HTTPStatus.OK


def test_startup_prints_the_url_and_the_redirect_uri_to_register_and_nothing_secret() -> None:
    with running("--port", "0", env=ENV) as run:
        url = run.banner[1].split()[-1]
        assert run.banner[2].split()[-1] == url.rstrip("/") + demo.CALLBACK_PATH
        assert "to register" in run.banner[2] and run.banner[4].split()[-1] == "memory"
        with demo.new_opener(NO_PROXY).open(url, timeout=10) as answer:
            assert answer.status == HTTPStatus.OK
    assert CLIENT_SECRET not in "".join(run.banner) + run.out + run.err


def without_the_sandbox(path: Any) -> Any:
    """The module as the comment over its sandbox section says to copy it, written to path."""
    lines = pathlib.Path(MODULE).read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(n for n, line in enumerate(lines) if line.startswith("# Sandbox: a stand-in"))
    end = next(n for n, line in enumerate(lines) if line.startswith("# End of the sandbox"))
    path.write_text("".join(lines[:start - 1] + lines[end + 1:]), encoding="utf-8")
    return path


def readme_examples() -> list[str]:
    readme = pathlib.Path(MODULE).with_name("README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("example", readme_examples())
def test_every_python_block_of_the_readme_runs(example: str) -> None:
    exec(compile(example, "README.md", "exec"), {})  # noqa: S102 -- our own README


@pytest.mark.skipif(os.name != "posix", reason="the README's command is for a POSIX shell")
def test_the_readmes_look_inside_command_reads_the_store_and_never_makes_one(
        tmp_path: Any) -> None:
    readme = pathlib.Path(MODULE).with_name("README.md").read_text(encoding="utf-8")
    [command] = re.findall(r'^python3 -c "import sqlite3.*"$', readme, re.MULTILINE)

    def look() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True,
                              text=True, timeout=20, check=False, executable="/bin/sh")

    assert look().returncode != 0 and list(tmp_path.iterdir()) == []  # before the app ran
    with contextlib.closing(demo.Store(str(tmp_path / "connections.db"))) as store:
        store.save(SESSION_A, CONNECTION)
    assert SESSION_A in look().stdout


def test_the_readmes_login_and_callback_handlers_connect_with_a_scripted_mailchimp(
        mailchimp: FakeMailchimp) -> None:
    [example] = readme_examples()
    names: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), names)  # noqa: S102 -- our own README
    names["opener"] = mailchimp  # instead of urllib's, which would reach the network
    session: dict[str, str] = {}
    address = names["start_login"](session)
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(address).query))["state"]
    other = names["finish_login"]({"mailchimp_state": "x" * 43}, "user-1",
                                  f"code={CODE}&state={state}")  # someone else's callback
    assert other[0] == HTTPStatus.BAD_REQUEST and mailchimp.sent == []  # nothing was sent
    assert names["finish_login"](session, "user-1", f"code={CODE}&state={state}") == (
        HTTPStatus.SEE_OTHER, "Connected.")
    assert names["database"] == {"user-1": (TOKEN, "us19")} and session == {}


def test_the_copy_recipe_leaves_a_module_that_runs_and_logs_in_without_the_sandbox(
        tmp_path: Any, mailchimp: FakeMailchimp, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = without_the_sandbox(tmp_path / "mailchimp_oauth.py")
    assert "Sandbox" not in copy.read_text() and "SANDBOX = " not in copy.read_text()
    shown = subprocess.run([sys.executable, str(copy), "--help"], capture_output=True,
                           text=True, timeout=20, check=False)
    assert shown.returncode == 0 and "--port" in shown.stdout and "sandbox" not in shown.stdout
    with running("--port", "0", env=ENV, module=str(copy)) as run:
        assert Browser(run.port).get("/").status == HTTPStatus.OK
    spec = importlib.util.spec_from_file_location("mailchimp_oauth", copy)
    assert spec is not None and spec.loader is not None
    copied = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mailchimp_oauth", copied)  # as an import would
    spec.loader.exec_module(copied)
    server, _ = copied.make_server(copied.Config(CLIENT_ID, CLIENT_SECRET), port=0,
                                   opener=mailchimp)
    with serving(server):
        assert Browser(server.server_port).connect().status == HTTPStatus.SEE_OTHER
    assert mailchimp.urls() == [TOKEN_URL, METADATA_URL, PING_URL]


@pytest.mark.parametrize("env, args, says", [
    ({}, [], "MAILCHIMP_CLIENT_ID is not set"),
    ({"MAILCHIMP_CLIENT_ID": CLIENT_ID}, [], "MAILCHIMP_CLIENT_SECRET is not set"),
    ({**ENV, "MAILCHIMP_LOGIN_URL": "http://login.example.com"}, [], "must use https://"),
    (ENV, ["--host", "0.0.0.0"], "needs --base-url"),
    (ENV, ["--host", "192.168.1.5"], "needs --base-url"),
    (ENV, ["--base-url", "http://192.168.1.5:3000"], "plain text"),
])
def test_a_bad_setting_is_one_line_and_exit_status_2(
        env: dict[str, str], args: list[str], says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--port", "0", *args], environ=env) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_store_it_cannot_read_stops_startup_with_one_line(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"{ half a file")
    path.chmod(0o600)
    assert demo.main(["--port", "0", "--store", str(path)], environ=ENV) == 2
    err = capsys.readouterr().err
    assert "not a store this app can use" in err and "left as it is" in err
    assert err.count("\n") == 1 and path.read_bytes() == b"{ half a file"


@pytest.mark.parametrize("args, says", [
    (["--port", "70000"], "0 to 65535"), (["--port", "-1"], "0 to 65535"),
    (["--port", "\u0663"], "0 to 65535"), (["--timeout", "0"], "more than 0"),
    (["--timeout", "inf"], "at most 300"), (["--timeout", "nan"], "more than 0"),
    (["--quiet", "--verbose"], "not allowed with"),
])
def test_a_bad_option_is_refused_before_anything_starts(
        args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        demo.main(args, environ=ENV)
    assert exit.value.code == 2 and says in capsys.readouterr().err


def test_a_port_in_use_is_one_line_and_exit_status_2(
        server: demo.Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--port", str(server.server_port)], environ=ENV) == 2
    err = capsys.readouterr().err
    assert "cannot listen" in err and "--port" in err and err.count("\n") == 1


def test_help_names_the_environment_and_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    for variable in ("MAILCHIMP_CLIENT_ID", "MAILCHIMP_CLIENT_SECRET", "MAILCHIMP_LOGIN_URL",
                     "MAILCHIMP_API_URL", "default 127.0.0.1", "default 3000"):
        assert variable in text


def test_starting_up_asks_no_resolver_for_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(name: str = "") -> str:
        raise AssertionError(f"reverse DNS lookup of {name!r}")
    monkeypatch.setattr(socket, "getfqdn", no_dns)  # http.server's server_bind calls it
    server, _ = demo.make_server(CONFIG, port=0)
    with serving(server):
        assert Browser(server.server_port).get("/").status == HTTPStatus.OK


# ---------------------------------------------------------------------------
# Sandbox: the whole flow over real sockets, against the stand-in
# ---------------------------------------------------------------------------

def decide(browser: Browser, decision: str) -> str:
    """Step 2 and the consent page, as a person does them; returns where the stand-in sends
    the browser back to (the callback, with a code or an error)."""
    consent = browser.get(browser.get("/auth/mailchimp").headers["Location"])
    [(action, fields)] = Forms(consent.text).forms.items()
    answer = browser.submit(consent, action, {**fields, "decision": decision})
    assert answer.status == HTTPStatus.FOUND, answer.text
    return str(answer.headers["Location"])


def click(browser: Browser, decision: str) -> Page:
    """Steps 2 to 7 with the user clicking Allow or Deny."""
    return browser.get(decide(browser, decision))


@pytest.fixture
def stand_in(clock: Clock) -> Iterator[demo.Sandbox]:
    server = demo.Server(("127.0.0.1", 0), label="sandbox: ")
    server.app = sandbox = demo.Sandbox(server.origin, clock=clock)
    with serving(server):
        yield sandbox


@pytest.fixture
def sandboxed(stand_in: demo.Sandbox) -> Iterator[Browser]:
    server, _ = demo.sandboxed(stand_in, demo.parse_args(["--sandbox", "--port", "0"]))
    with serving(server):
        yield Browser(server.server_port)


def test_sandbox_allow_connects_to_the_sandbox_account(sandboxed: Browser) -> None:
    assert click(sandboxed, "allow").status == HTTPStatus.SEE_OTHER
    page = sandboxed.get("/")
    assert "Sandbox Account" in page.text and demo.SANDBOX_PREFIX in page.text
    assert "Everything&#x27;s Chimpy!" in page.text


def test_sandbox_deny_comes_back_as_access_denied(sandboxed: Browser) -> None:
    page = click(sandboxed, "deny")
    assert page.status == HTTPStatus.FORBIDDEN and "access_denied" in page.text


def test_sandbox_refuses_a_replayed_code(sandboxed: Browser) -> None:
    callback = decide(sandboxed, "allow")
    assert sandboxed.get(callback).status == HTTPStatus.SEE_OTHER
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))["code"]
    page = sandboxed.callback(code=code, state=sandboxed.start_login())  # a fresh state
    assert page.status == HTTPStatus.BAD_GATEWAY and "invalid_grant" in page.text


def test_sandbox_refuses_the_secret_after_rotation_and_the_page_says_so(
        sandboxed: Browser, stand_in: demo.Sandbox) -> None:
    stand_in.client_secret = demo.new_secret()  # rotated in "Mailchimp"; the app has the old one
    page = click(sandboxed, "allow")
    assert page.status == HTTPStatus.BAD_GATEWAY
    assert "invalid_client" in page.text and "rotated" in page.text


def test_sandbox_after_a_restart_says_only_what_happened(
        sandboxed: Browser, stand_in: demo.Sandbox) -> None:
    assert click(sandboxed, "allow").status == HTTPStatus.SEE_OTHER
    stand_in._tokens.clear()  # as the stand-in is after the app restarts with --store
    page = sandboxed.press("/ping")
    assert page.status == HTTPStatus.BAD_GATEWAY
    assert html.escape(demo.SANDBOX_RESTARTED, quote=True) in page.text
    assert "removed the app" not in page.text  # true of Mailchimp, not of the stand-in


def test_sandbox_error_pages_lead_back_to_the_app(sandboxed: Browser,
                                                  stand_in: demo.Sandbox) -> None:
    page = sandboxed.get(f"{stand_in.url}/oauth2/authorize?response_type=token")
    assert page.status == HTTPStatus.BAD_REQUEST
    assert f'<a href="{sandboxed.origin}/">' in page.text


def test_sandbox_pages_say_sandbox(sandboxed: Browser) -> None:
    consent = sandboxed.get(sandboxed.get("/auth/mailchimp").headers["Location"])
    for page in (consent, sandboxed.get("/"), sandboxed.get("/nowhere")):
        assert "SANDBOX" in page.text


def test_sandbox_consent_form_may_send_the_browser_back_to_the_app_only(
        sandboxed: Browser) -> None:
    consent = sandboxed.get(sandboxed.get("/auth/mailchimp").headers["Location"])
    policy = consent.headers["Content-Security-Policy"]
    assert f"form-action 'self' {sandboxed.origin};" in policy


# --- the stand-in refuses what Mailchimp refuses ---------------------------

def authorize_query(sandbox: demo.Sandbox, **changes: str) -> str:
    fields = {"response_type": "code", "client_id": sandbox.client_id,
              "redirect_uri": sandbox.redirect_uri, "state": "s", **changes}
    return urllib.parse.urlencode({name: value for name, value in fields.items() if value})


@pytest.mark.parametrize("changes, says", [
    ({"redirect_uri": "http://127.0.0.1:1/oauth/mailchimp/callback"}, "redirect_uri must be"),
    ({"redirect_uri": ""}, "redirect_uri must be"),
    ({"client_id": "someone-else"}, "client_id"),
    ({"response_type": "token"}, "response_type"),
    ({"scope": "audiences"}, "no scopes"),
])
def test_stand_in_authorize_refuses_a_bad_request_without_redirecting(
        stand_in: demo.Sandbox, changes: dict[str, str], says: str) -> None:
    stand_in.redirect_uri = "http://127.0.0.1:3000/oauth/mailchimp/callback"
    page = Browser(0).get(f"{stand_in.url}/oauth2/authorize?{authorize_query(stand_in, **changes)}")
    assert page.status == HTTPStatus.BAD_REQUEST and "Location" not in page.headers
    assert says in page.text and "SANDBOX" in page.text


def token_fields(sandbox: demo.Sandbox, **changes: str) -> dict[str, str]:
    sandbox.redirect_uri = "http://127.0.0.1:3000/oauth/mailchimp/callback"
    fields = {"grant_type": "authorization_code", "client_id": sandbox.client_id,
              "client_secret": sandbox.client_secret, "redirect_uri": sandbox.redirect_uri,
              "code": sandbox.issue_code(sandbox.redirect_uri), **changes}
    return {name: value for name, value in fields.items() if value != "-"}


def test_stand_in_token_answers_mailchimps_shape(stand_in: demo.Sandbox) -> None:
    page = post_form(f"{stand_in.url}/oauth2/token", token_fields(stand_in))
    answer = json.loads(page.text)
    assert page.status == HTTPStatus.OK and set(answer) == {"access_token", "expires_in", "scope"}
    assert (answer["expires_in"], answer["scope"]) == (0, None)


@pytest.mark.parametrize("changes, status, error", [
    ({"client_secret": "rotated-away"}, 401, "invalid_client"),
    ({"client_id": "someone-else"}, 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
    ({"code": "made-up"}, 400, "invalid_grant"),
    ({"redirect_uri": "http://127.0.0.1:3000/other"}, 400, "invalid_grant"),
    ({"code": "-"}, 400, "invalid_request"),
    ({"scope": "x"}, 400, "invalid_request"),
])
def test_stand_in_token_refuses_what_mailchimp_refuses(
        stand_in: demo.Sandbox, changes: dict[str, str], status: int, error: str) -> None:
    page = post_form(f"{stand_in.url}/oauth2/token", token_fields(stand_in, **changes))
    assert (page.status, json.loads(page.text)["error"]) == (status, error)


def test_stand_in_token_refuses_json(stand_in: demo.Sandbox) -> None:
    page = Browser(0).request("POST", f"{stand_in.url}/oauth2/token",
                              json.dumps(token_fields(stand_in)).encode(),
                              {"Content-Type": "application/json"})
    assert (page.status, json.loads(page.text)["error"]) == (400, "invalid_request")


def test_stand_in_codes_are_single_use_and_expire(stand_in: demo.Sandbox, clock: Clock) -> None:
    fields = token_fields(stand_in)
    url = f"{stand_in.url}/oauth2/token"
    assert post_form(url, fields).status == HTTPStatus.OK
    assert json.loads(post_form(url, fields).text)["error"] == "invalid_grant"
    late = token_fields(stand_in)
    clock.now += demo.LOGIN_LIFETIME + 1
    assert json.loads(post_form(url, late).text)["error"] == "invalid_grant"


def test_stand_in_forgets_the_codes_that_expired(stand_in: demo.Sandbox, clock: Clock) -> None:
    for _ in range(5):
        stand_in.issue_code(stand_in.redirect_uri)  # logins nobody finished
    clock.now += demo.LOGIN_LIFETIME + 1
    fresh = stand_in.issue_code(stand_in.redirect_uri)
    assert list(stand_in._codes) == [fresh]  # memory holds only what can still be used


def issued_token(sandbox: demo.Sandbox) -> str:
    page = post_form(f"{sandbox.url}/oauth2/token", token_fields(sandbox))
    return str(json.loads(page.text)["access_token"])


@pytest.mark.parametrize("scheme, status", [("OAuth", 200), ("Bearer", 401), ("", 401)])
def test_stand_in_metadata_wants_the_oauth_scheme(stand_in: demo.Sandbox, scheme: str,
                                                  status: int) -> None:
    token = issued_token(stand_in)
    page = Browser(0).get(f"{stand_in.url}/oauth2/metadata",
                          Authorization=f"{scheme} {token}".strip())
    assert page.status == status
    if status == 200:
        assert json.loads(page.text)["dc"] == demo.SANDBOX_PREFIX


@pytest.mark.parametrize("authorization, status, says", [
    ("Bearer {token}", 200, "Chimpy"), ("OAuth {token}", 200, "Chimpy"),
    ("Bearer not-issued", 401, "forgets its tokens when the app restarts"),
    ("", 401, "Send Authorization: Bearer"),
])
def test_stand_in_ping_wants_an_issued_token(stand_in: demo.Sandbox, authorization: str,
                                             status: int, says: str) -> None:
    header = authorization.format(token=issued_token(stand_in))
    page = Browser(0).get(f"{stand_in.url}/{demo.SANDBOX_PREFIX}/3.0/ping",
                          **({"Authorization": header} if header else {}))
    assert page.status == status and says in page.text
    if status == 401:
        assert page.headers["Content-Type"].startswith("application/problem+json")


def run_sandbox_login(*args: str) -> str:
    """python mailchimp_oauth_demo.py --sandbox ARGS, one login through it; its stderr."""
    with running("--sandbox", "--port", "0", *args, env={}) as run:
        assert click(Browser(run.port), "allow").status == HTTPStatus.SEE_OTHER
    return run.err


def test_the_terminal_shows_the_steps_quiet_hides_them_verbose_adds_each_request() -> None:
    default, quiet, verbose = (run_sandbox_login(*args) for args in ((), ("--quiet",),
                                                                      ("--verbose",)))
    assert " INFO step 4 " in default and " DEBUG " not in default
    assert " INFO " not in quiet and " DEBUG " not in quiet
    assert " INFO step 4 " in verbose and " DEBUG sandbox: 127.0.0.1 POST /oauth2/token" in verbose


def test_sandbox_command_runs_the_whole_flow_offline_with_no_settings() -> None:
    proxy = "http://127.0.0.1:9"  # nothing listens there: a request through it would fail
    with running("--sandbox", "--port", "0", env={"http_proxy": proxy, "HTTP_PROXY": proxy,
                                                  "https_proxy": proxy}) as run:
        assert "SANDBOX" in run.banner[5] and "stand-in" in run.banner[2]
        assert "register" not in run.banner[2]
        browser = Browser(run.port)
        assert click(browser, "allow").status == HTTPStatus.SEE_OTHER
        assert "Sandbox Account" in browser.get("/").text
