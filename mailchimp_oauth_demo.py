#!/usr/bin/env python3
"""Mailchimp's OAuth 2 flow, step by step, in one standard-library module.

The Python counterpart of the Express sample in Mailchimp's guide "Access Data on
Behalf of Other Users with OAuth 2": a small web app that connects a Mailchimp
account and says each step in the log as it happens. The guide numbers its sample's
routes 1 to 3; this module splits the guide's step 3 into the four calls it makes:

  guide  here
  1      1. GET /                          a page with a "Connect with Mailchimp" button
  2      2. GET /auth/mailchimp            redirect to Mailchimp's authorize page, with a `state`
  3      3. GET /oauth/mailchimp/callback  Mailchimp sends the browser back: check `state`
         4. POST {login}/oauth2/token      trade the code for an access token (a form)
         5. GET {login}/oauth2/metadata    learn the account's server prefix ("dc", e.g. us19)
         6. GET {api}/ping                 call the Marketing API with the token
         7. keep the token and prefix, and redirect to /, which shows the result

Then POST /ping uses the kept token again, and POST /disconnect forgets it.

Try it offline with `python3 mailchimp_oauth_demo.py --sandbox` (a stand-in for Mailchimp:
the last section of the whole module), or for real with MAILCHIMP_CLIENT_ID and
MAILCHIMP_CLIENT_SECRET set (`--help` lists the rest; the README tells the whole story).

Or use the steps in your own app: everything above the line "# End of the steps" stands
alone (the README shows how to copy it). Steps 2 and 3 need no network at all:

    >>> config = Config("your-client-id", "your-client-secret", "https://your.app")
    >>> state = new_secret()  # step 2: keep it in this browser's session
    >>> authorize_url(config, state).startswith("https://login.mailchimp.com/oauth2/authorize?")
    True
    >>> check_callback(f"code=1f2e3d4c5b6a&state={state}", state)  # step 3: back with a code
    '1f2e3d4c5b6a'

Then connect(new_opener(), config, query, state) runs steps 3 to 6 and returns the
Connection to keep (step 7), or raises FlowError with a status, a message and a hint.

Each safety measure says why it is there where it is made. This is teaching code, not
a production server: http.server is not reviewed for security, and the --store database
holds tokens unencrypted. In production put a real web framework, HTTPS and your own
database (the token encrypted at rest) around the same steps.
"""

from __future__ import annotations

import email.message
import hmac
import http.client
import ipaddress
import json
import logging
import re
import secrets
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

__all__ = [  # noqa: RUF022 -- the public names in the flow's order, not the alphabet's
    "Config", "ConfigError", "Opener", "new_opener", "FlowError", "new_secret",
    "authorize_url", "check_callback", "exchange_code", "Account", "find_account", "ping",
    "Connection", "connect", "mask",
]

logger = logging.getLogger("mailchimp_oauth_demo")  # not __name__: that is "__main__" when run
logger.addHandler(logging.NullHandler())  # an app that imports us decides where the log goes


# ---------------------------------------------------------------------------
# Configuration: who the app is, and where Mailchimp is
# ---------------------------------------------------------------------------

LOGIN_URL = "https://login.mailchimp.com"
API_URL = "https://{dc}.api.mailchimp.com/3.0"  # {dc}: the account's server prefix
CALLBACK_PATH = "/oauth/mailchimp/callback"


class ConfigError(Exception):
    """A setting is missing or unsafe; the message names it and says why."""


@dataclass(frozen=True)
class Config:
    """What the app knows about itself and about Mailchimp."""

    client_id: str
    client_secret: str = field(repr=False)  # repr=False: a logged Config never shows it
    base_url: str = ""  # where browsers reach this app, e.g. http://127.0.0.1:3000
    login_url: str = LOGIN_URL
    api_url: str = API_URL
    timeout: float = 10.0  # seconds for each call to Mailchimp (see send); then a 504

    def __post_init__(self) -> None:
        if self.base_url:  # written as browsers write origins, so that comparisons hold
            object.__setattr__(self, "base_url", check_base_url(self.base_url))
        for name in ("login_url", "api_url"):  # paths are added to them: no trailing slash
            object.__setattr__(self, name, getattr(self, name).rstrip("/"))
        check_upstream_url("login_url", self.login_url)  # the secret and tokens go there
        check_upstream_url("api_url", self.api_url, server_prefix=True)

    @property
    def redirect_uri(self) -> str:
        """The callback URL: registered in Mailchimp and sent in steps 2 and 4, byte for byte."""
        if not self.base_url:  # a relative one would reach Mailchimp and fail there
            raise ConfigError("Config needs base_url, e.g. http://127.0.0.1:3000")
        return self.base_url + CALLBACK_PATH


def check_base_url(base_url: str, name: str = "base_url") -> str:
    """The app's own address, as an origin (the callback path is added to it), written as
    browsers write it in an Origin header. The code and the session cookie travel to it, so
    plain http:// is for this machine only, as for Mailchimp's URLs."""
    parts = urllib.parse.urlsplit(base_url)
    origin = origin_of(base_url)
    if parts.scheme not in ("http", "https") or not origin or parts.username:
        raise ConfigError(f"{name} {base_url!r} must look like http://127.0.0.1:3000 "
                          "or https://your.domain")
    for part, text in (("a path", parts.path.strip("/")), ("a query", parts.query),
                       ("a fragment", parts.fragment)):
        if text:
            raise ConfigError(f"{name} {base_url!r} has {part}; give only "
                              "scheme://host[:port]: the app lives at the root of its address")
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise ConfigError(f"{name} {base_url!r} would send codes and cookies across the "
                          "network in plain text: use https://, or an SSH tunnel to 127.0.0.1")
    return origin


def origin_of(url: str) -> str:
    """scheme://host[:port] as a browser's Origin header says it: lower case, no default
    port; "" if it is no URL. Compare these, never the strings people type."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    if not host or scheme not in ("http", "https"):
        return ""
    host = f"[{host}]" if ":" in host else host
    default = 80 if scheme == "http" else 443
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, judged from the text alone: no DNS to fool."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_upstream_url(name: str, url: str, *, server_prefix: bool = False) -> None:
    """Refuse plain http:// beyond this machine: the secret and tokens travel on these URLs.
    No user@ (it can hide the real host), query or fragment (paths are added to them); the
    API's needs {dc}, where the server prefix goes. Messages quote the URL as given."""
    if server_prefix and "{dc}" not in url:
        raise ConfigError(f"{name} must contain {{dc}}, where the server prefix goes")
    try:
        parts = urllib.parse.urlsplit(url.replace("{dc}", "us1"))
        host, _ = parts.hostname, parts.port  # .port raises ValueError if malformed
    except ValueError as err:
        raise ConfigError(f"{name}={url!r} is not a URL: {err}") from err
    if parts.query or parts.fragment or parts.username or not host:
        raise ConfigError(f"{name}={url!r} must be scheme://host[:port][/path] and nothing else")
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host)):
        return
    raise ConfigError(f"{name}={url!r} must use https:// "
                      "(plain http:// is allowed only for 127.0.0.1, ::1 or localhost)")


# ---------------------------------------------------------------------------
# The flow: steps 2 to 6, each one function (no server, no sockets of its own)
# ---------------------------------------------------------------------------

STEP_AUTHORIZE = "step 2 (authorize)"
STEP_CALLBACK = "step 3 (callback)"
STEP_TOKEN = "step 4 (token exchange)"
STEP_METADATA = "step 5 (metadata)"
STEP_PING = "step 6 (ping)"


class FlowError(Exception):
    """A step failed: the status to answer, the step, a message fit to log and, HTML-escaped,
    to show (no secret in it), the
    likely cause and fix, Mailchimp's own status when it answered with an error, and a
    heading for the page when the status alone would say it badly."""

    def __init__(self, status: HTTPStatus, step: str, message: str, hint: str = "",
                 mailchimp_status: int = 0, heading: str = "") -> None:
        super().__init__(f"{step}: {message}")
        self.status = status
        self.step = step
        self.message = message
        self.hint = hint
        self.mailchimp_status = mailchimp_status
        self.heading = heading


class Opener(Protocol):
    """The HTTP client the steps send through: new_opener() (urllib's, following no
    redirects), or a test's fake. open() returns a response with .status, .read1(n) and
    .close(), and may raise urllib.error.HTTPError (itself such a response), URLError,
    OSError or HTTPException."""

    def open(self, fullurl: urllib.request.Request, /, *, timeout: float) -> Any: ...


def new_secret() -> str:
    """256 random bits, URL-safe: RFC 6749 §10.10 wants guessing odds below 2^-128."""
    return secrets.token_urlsafe(32)


def authorize_url(config: Config, state: str) -> str:
    """Step 2: where to send the browser to log in to Mailchimp and approve this app. Make
    `state` with new_secret() and keep it for this browser: step 3 checks it comes back."""
    query = urllib.parse.urlencode({
        "response_type": "code",
        "client_id": config.client_id,
        "redirect_uri": config.redirect_uri,
        "state": state,  # RFC 6749 §10.12: ties the callback to the browser that started here
    })  # no `scope`: Mailchimp has none and rejects the parameter
    return f"{config.login_url}/oauth2/authorize?{query}"


def check_callback(query: str, state: str) -> str:
    """Step 3: the code in the callback's query string (the text after "?", as it came), if
    its state is the one this browser was given in step 2; forget that state as you pass
    it, so it works once. Without the check anyone could send your browser here with their
    own code, and connect you to their account (RFC 6749 §10.12)."""
    try:
        fields = parse_fields(query)
    except ValueError as err:
        raise FlowError(HTTPStatus.BAD_REQUEST, STEP_CALLBACK,
                        f"The callback's query string could not be read ({err}).",
                        HINT_START_AGAIN) from err
    if not fields.get("state"):
        raise FlowError(HTTPStatus.BAD_REQUEST, STEP_CALLBACK, "The callback has no state.",
                        HINT_START_AGAIN)
    if not (state and hmac.compare_digest(fields["state"].encode(), state.encode())):
        raise FlowError(HTTPStatus.BAD_REQUEST, STEP_CALLBACK, "This callback does not carry "
                        "the state this browser was given in step 2, or that state was used "
                        "already.", HINT_START_AGAIN)
    if fields.get("error"):
        raise authorization_error(fields["error"], fields.get("error_description", ""))
    code = fields.get("code", "")
    if not AUTH_CODE.fullmatch(code):
        raise FlowError(HTTPStatus.BAD_REQUEST, STEP_CALLBACK, "The callback carries no code."
                        if not code else "The callback's code does not look like one.",
                        HINT_START_AGAIN)
    narrate(STEP_CALLBACK, f"the browser is back with a code ({mask(code)}) and the state "
            "this browser was given")
    return code


def exchange_code(opener: Opener, config: Config, code: str) -> str:
    """Step 4: trade the one-time code, with the client id and secret, for an access token.
    Mailchimp wants a form here, not JSON, and the redirect URI of step 2 byte for byte."""
    form = urllib.parse.urlencode({
        "grant_type": "authorization_code", "client_id": config.client_id,
        "client_secret": config.client_secret, "redirect_uri": config.redirect_uri,
        "code": code,
    })
    request = urllib.request.Request(
        config.login_url + "/oauth2/token", data=form.encode("ascii"), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded",
                 "Accept": "application/json"})
    reply = send(opener, request, config.timeout, STEP_TOKEN)
    token = reply_field(reply_json(reply, STEP_TOKEN), STEP_TOKEN, "access_token")
    if not ACCESS_TOKEN.fullmatch(token):  # it goes into a header next: no spaces, no CR/LF
        raise FlowError(HTTPStatus.BAD_GATEWAY, STEP_TOKEN,
                        "Mailchimp's access token has characters a token cannot have.",
                        HINT_UNEXPECTED)
    narrate(STEP_TOKEN, f"{summary(request, reply)}: access token {mask(token)}, "
            "which does not expire")
    return token


@dataclass(frozen=True)
class Account:
    """Step 5: the part of Mailchimp's metadata this app uses."""

    server_prefix: str
    name: str


def find_account(opener: Opener, config: Config, token: str) -> Account:
    """Step 5: whose account the token opens and, above all, its server prefix, which
    becomes part of every API address: it must look like one (letters, then digits)."""
    request = authorized_request(config.login_url + "/oauth2/metadata",
                                 f"OAuth {token}")  # this endpoint's scheme; the API's is Bearer
    reply = send(opener, request, config.timeout, STEP_METADATA)
    data = reply_json(reply, STEP_METADATA)
    prefix = reply_field(data, STEP_METADATA, "dc")
    if not SERVER_PREFIX.fullmatch(prefix):  # "evil.example/x#" would send the token elsewhere
        raise FlowError(HTTPStatus.BAD_GATEWAY, STEP_METADATA,
                        f"Mailchimp's server prefix {printable(prefix)!r} does not look like "
                        "one (letters then digits, like us19).",
                        "No address was built from it, so the token went nowhere. "
                        + HINT_UNEXPECTED)
    name = data.get("accountname")  # only shown: Mailchimp leaves it out for some accounts
    account = Account(prefix, printable(name) if isinstance(name, str) and name else NO_NAME)
    narrate(STEP_METADATA, f"{summary(request, reply)}: server prefix {prefix}, "
            f"account {account.name!r}")
    return account


def ping(opener: Opener, config: Config, server_prefix: str, token: str) -> str:
    """Step 6: a first call to the Marketing API, at the account's own server prefix; its
    health status, e.g. "Everything's Chimpy!"."""
    url = config.api_url.replace("{dc}", server_prefix) + "/ping"
    request = authorized_request(url, f"Bearer {token}")
    reply = send(opener, request, config.timeout, STEP_PING)
    health = printable(reply_field(reply_json(reply, STEP_PING), STEP_PING, "health_status"))
    narrate(STEP_PING, f"{summary(request, reply)}: {health!r}")
    return health


@dataclass(frozen=True)
class Connection:
    """What step 7 keeps for a browser: in a real app, a row for this user in your database."""

    access_token: str = field(repr=False)
    server_prefix: str
    account_name: str
    connected_at: str  # UTC, as utc_now() writes it, like pinged_at
    pinged_at: str
    health_status: str  # what the ping at pinged_at answered


def connect(opener: Opener, config: Config, query: str, state: str) -> Connection:
    """Steps 3 to 6 in the guide's order: the callback's code (if its state is this
    browser's), the token for it, the account's server prefix, and a first ping. Keeping
    the result is step 7."""
    code = check_callback(query, state)
    token = exchange_code(opener, config, code)
    account = find_account(opener, config, token)
    health = ping(opener, config, account.server_prefix, token)
    now = utc_now()
    return Connection(token, account.server_prefix, account.name, now, now, health)


# ---------------------------------------------------------------------------
# What the steps share: talking to Mailchimp, reading its replies, saying what failed
# ---------------------------------------------------------------------------

MAX_REPLY_BYTES = 64 * 1024  # Mailchimp's replies are tiny; a huge one is a fault, not data
AUTH_CODE = re.compile(r"[\x20-\x7e]{1,512}")  # RFC 6749 App. A.11: code is printable ASCII
ACCESS_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{1,512}=*")  # RFC 6750 §2.1: safe in a header
SERVER_PREFIX = re.compile(r"[a-z]{1,10}[0-9]{1,10}")  # "us19": nothing that can reshape a URL
NO_NAME = "(Mailchimp gave no account name)"

# The likely cause of each failure and its fix, in words for any app: settings are named as
# Config's fields (an app that reads them from elsewhere says so where it shows the hint).
HINT_START_AGAIN = "Start again from the beginning, in this browser."
HINT_ROTATED_SECRET = ("Mailchimp did not accept Config.client_id and Config.client_secret. If "
                       "the secret was rotated, use the new one.")
HINT_OLD_CODE = ("Mailchimp's codes work once, and only for about 30 seconds: the code was used "
                 "already or came back too late, or redirect_uri is not the one sent in step "
                 "2. Start again; if it keeps happening, register exactly Config.redirect_uri.")
HINT_REVOKED = ("Mailchimp no longer accepts this token: the user may have removed the app "
                "from their account, and must connect again.")
HINT_METADATA_TOKEN = ("The metadata call must send 'Authorization: OAuth <token>' with the "
                       "token just issued.")
HINT_UNEXPECTED = ("Mailchimp's answer is not what its guide describes. If Config.login_url "
                   "or Config.api_url point at another server, look there.")
HINT_UNREACHABLE = ("Check the internet connection, any proxy settings, and "
                    "Config.login_url and Config.api_url.")
HINT_SLOW = "Try again; on a slow network, give Mailchimp longer (Config.timeout)."
HINT_BUSY = "Mailchimp is having trouble; try again in a minute."
HINTS = {  # Mailchimp's refusals: (step, its error or status) -> hint
    (STEP_TOKEN, "invalid_client"): HINT_ROTATED_SECRET,
    (STEP_TOKEN, HTTPStatus.UNAUTHORIZED): HINT_ROTATED_SECRET,
    (STEP_TOKEN, "invalid_grant"): HINT_OLD_CODE,
    (STEP_TOKEN, "redirect_uri_mismatch"): HINT_OLD_CODE,
    (STEP_TOKEN, "invalid_request"): ("Mailchimp wants the five fields as a form "
                                      "(application/x-www-form-urlencoded), not JSON."),
    (STEP_METADATA, HTTPStatus.UNAUTHORIZED): HINT_METADATA_TOKEN,
    (STEP_METADATA, "invalid_token"): HINT_METADATA_TOKEN,
    (STEP_PING, HTTPStatus.UNAUTHORIZED): HINT_REVOKED + " (Or the call went to another "
                                                         "account's server prefix.)",
    (STEP_PING, HTTPStatus.NOT_FOUND): ("The API address is wrong: Config.api_url must "
                                        "contain {dc}, which step 5's server prefix replaces."),
}


@dataclass(frozen=True)
class Reply:
    """What Mailchimp answered: the status, the first MAX_REPLY_BYTES of the body, and how
    many seconds it took."""

    status: int
    body: bytes
    seconds: float = 0.0


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, not followed: Mailchimp's endpoints never send one, so a 3xx is an
    answer to report, not an address (perhaps ftp://, perhaps malformed) to send secrets to."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: email.message.Message) -> None:
        return None  # urllib then raises the answer as an HTTPError, which send() reads

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def new_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """urllib's opener for the steps (proxies as the environment says), with no redirects."""
    return urllib.request.build_opener(NoRedirects, *handlers)


def send(opener: Opener, request: urllib.request.Request, timeout: float, step: str) -> Reply:
    """Send one request to Mailchimp and read the answer, whatever its status; no answer in
    time is a 504, none at all a 502."""
    host, started = urllib.parse.urlsplit(request.full_url).netloc, time.monotonic()
    try:
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as err:  # urllib raises non-2xx answers; still answers
            response = err
        try:
            status, body = int(response.status), read_reply(response, started + timeout)
        finally:
            response.close()
    except (http.client.HTTPException, OSError) as err:  # URLError and timeouts are OSErrors
        raise no_answer_error(err, host, timeout, step) from err
    if len(body) > MAX_REPLY_BYTES:
        raise FlowError(HTTPStatus.BAD_GATEWAY, step, f"{host} sent an oversized reply.",
                        HINT_UNEXPECTED)
    return Reply(status, body, time.monotonic() - started)


def read_reply(response: Any, deadline: float) -> bytes:
    """The body, up to one byte past MAX_REPLY_BYTES, by the deadline: urllib's timeout
    bounds each wait for bytes, so a reply trickling in would take as long as it liked. (A
    wait begun just before the deadline may still last one timeout past it.)"""
    chunks: list[bytes] = []
    left = MAX_REPLY_BYTES + 1
    while left > 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the reply did not arrive in time")
        chunk = response.read1(left)  # whatever has arrived, at least a byte; b"" at the end
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def authorized_request(url: str, authorization: str) -> urllib.request.Request:
    """A GET carrying the token, which must never follow a redirect to another host."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    request.add_unredirected_header("Authorization", authorization)  # urllib copies plain headers
    return request


def reply_json(reply: Reply, step: str) -> dict[str, Any]:
    """A 2xx reply's JSON object; anything else is a 502 that says what Mailchimp said. So is
    a reply carrying `error`, whatever its status: Mailchimp's metadata endpoint answers a
    bad token with 200 and {"error": "invalid_token"}."""
    if not HTTPStatus.OK <= reply.status < HTTPStatus.MULTIPLE_CHOICES:  # not a 2xx
        raise refusal_error(reply, step)
    try:
        data = json.loads(reply.body.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise FlowError(HTTPStatus.BAD_GATEWAY, step, "Mailchimp's reply was not JSON.",
                        HINT_UNEXPECTED) from err
    if not isinstance(data, dict):
        raise FlowError(HTTPStatus.BAD_GATEWAY, step, "Mailchimp's reply was not a JSON object.",
                        HINT_UNEXPECTED)
    if "error" in data:
        raise refusal_error(reply, step)
    return data


def reply_field(data: dict[str, Any], step: str, name: str) -> str:
    """One non-empty string field of a reply."""
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise FlowError(HTTPStatus.BAD_GATEWAY, step, f"Mailchimp's reply has no {name} text.",
                        HINT_UNEXPECTED)
    return value


def authorization_error(error: str, description: str) -> FlowError:
    """Step 3's error when Mailchimp's authorization sent an error instead of a code: the
    user clicked Deny (403), or Mailchimp could not go on (502)."""
    said = printable(f"{error}: {description}".rstrip(": "))
    if error == "access_denied":
        return FlowError(HTTPStatus.FORBIDDEN, STEP_CALLBACK,
                         f"Access was not granted, so nothing was shared ({said}).",
                         "You can connect whenever you like.", heading="Access not granted")
    busy = error in ("server_error", "temporarily_unavailable")  # RFC 6749 §4.1.2.1
    hint = HINT_BUSY if busy else "Check that Config.client_id is a registered app's client_id."
    return FlowError(HTTPStatus.BAD_GATEWAY, STEP_CALLBACK,
                     f"Mailchimp refused the authorization request ({said}).", hint,
                     heading="Mailchimp could not authorize this app")


def refusal_error(reply: Reply, step: str) -> FlowError:
    """A non-2xx reply as a 502, quoting Mailchimp's OAuth error or API problem."""
    error, said = mailchimp_said(reply.body)
    if HTTPStatus.MULTIPLE_CHOICES <= reply.status < HTTPStatus.BAD_REQUEST:
        said = "a redirect, which these endpoints never send; it was not followed"
    message = f"Mailchimp answered {reply.status}" + (f": {said}" if said else ".")
    hint = HINTS.get((step, error)) or HINTS.get((step, reply.status)) or (
        HINT_BUSY if reply.status >= HTTPStatus.INTERNAL_SERVER_ERROR else HINT_UNEXPECTED)
    return FlowError(HTTPStatus.BAD_GATEWAY, step, message, hint, reply.status,
                     heading="Mailchimp refused")


def no_answer_error(err: Exception, host: str, timeout: float, step: str) -> FlowError:
    """Why no answer came: too slow is a 504; unreachable or cut off is a 502."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err  # urllib wraps it
    if isinstance(reason, (TimeoutError, socket.timeout)):  # two classes on Python 3.9
        return FlowError(HTTPStatus.GATEWAY_TIMEOUT, step,
                         f"{host} did not answer within {timeout:g} s.", HINT_SLOW,
                         heading="Mailchimp did not answer in time")
    if isinstance(err, urllib.error.URLError):
        return FlowError(HTTPStatus.BAD_GATEWAY, step,
                         f"Could not reach {host}: {printable(str(reason))}.", HINT_UNREACHABLE,
                         heading="Mailchimp could not be reached")
    return FlowError(HTTPStatus.BAD_GATEWAY, step,
                     f"{host} broke off its answer ({type(err).__name__}).", HINT_UNREACHABLE,
                     heading="Mailchimp broke off its answer")


def mailchimp_said(body: bytes) -> tuple[str, str]:
    """The error code and its words from an error body, OAuth style or problem+json style."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    words = [data.get(key) for key in ("error", "error_description", "title", "detail")]
    said = ": ".join(printable(word) for word in words if isinstance(word, str) and word)
    error = data.get("error")
    return (error if isinstance(error, str) else ""), said


def parse_fields(text: str) -> dict[str, str]:
    """URL-encoded fields, strictly: UTF-8, at most ten, none repeated (which would be meant?)."""
    pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict",
                                   max_num_fields=10)
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ValueError("a parameter is repeated")
    return fields


def printable(text: str, limit: int = 200) -> str:
    """Outside text made fit for a log line (and, once HTML-escaped, a page): no control
    characters, bounded length."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def mask(secret: str) -> str:
    """Enough of a token or code to recognise it, not enough to use it (and nothing at all
    of one too short to spare four characters)."""
    return "..." + secret[-4:] if len(secret) >= 16 else "..."


def narrate(step: str, what: str) -> None:
    """One line a step as a login happens, for people learning the flow: nothing secret."""
    logger.info("%s: %s", step, what)


def summary(request: urllib.request.Request, reply: Reply) -> str:
    """A call to Mailchimp in a few words: what went where, the status, and how long it took."""
    return (f"{request.get_method()} {request.full_url} -> {reply.status} "
            f"in {reply.seconds * 1000:.0f} ms")


def utc_now() -> str:
    """The time, as the store and the pages show it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


# End of the steps ==========================================================
# Everything above stands alone: copied into a file of its own, it is the flow for any
# app. Below, this demo's web app around it, down to the sandbox at the very end; the
# app's imports are here rather than at the top, so that the part above needs none of them.

import argparse
import base64
import contextlib
import errno
import hashlib
import html
import http.server
import io
import math
import os
import signal
import socketserver
import sqlite3
import ssl
import stat
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, replace

__all__ += ["OAuthDemo", "Store", "make_server", "main"]  # noqa: RUF022 -- in reading order


# ---------------------------------------------------------------------------
# The app: the routes a browser follows through the steps, and what they remember
# ---------------------------------------------------------------------------

STEP_KEEP = "step 7 (keeping the connection)"  # the app's own step: the steps above stop at 6


@dataclass(frozen=True)
class Visit:
    """What the app reads from a request, already checked for shape."""

    path: str = "/"
    query: str = ""
    session: str = ""  # the session cookie, if it is well formed
    form: dict[str, str] | None = None  # the body's fields, if it is a small urlencoded form
    host: str = ""  # the Host header: the name the browser used for this app
    origin: str = ""  # where a browser says a POST comes from: the Origin header ...
    fetch_site: str = ""  # ... and Sec-Fetch-Site, in browsers that send it
    authorization: str = ""  # not read by the app: the sandbox's stand-in checks tokens in it


@dataclass(frozen=True)
class Response:
    """A response made before it is sent, with a note saying why for the log."""

    status: HTTPStatus
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/html; charset=utf-8"
    note: str = ""


class OAuthDemo:
    """The app: step 1's page, step 2's redirect, the callback that runs steps 3 to 7, and
    the two buttons of the connected page."""

    def __init__(self, config: Config, *, opener: Opener, store: Store,
                 logins: PendingLogins, notice: str = "") -> None:
        self.config, self.opener, self.store, self.logins = config, opener, store, logins
        self.notice = notice  # a line at the top of every page: the sandbox says SANDBOX
        self.hints: dict[tuple[str, int], str] = {}  # (step, Mailchimp's status) -> our words
        self.secure = config.base_url.startswith("https:")  # then cookies are Secure too
        self.netloc = urllib.parse.urlsplit(config.base_url).netloc  # its Host header
        self.hostname = urllib.parse.urlsplit(config.base_url).hostname or ""
        self.welcome = page("Mailchimp OAuth 2 demo", WELCOME, notice)  # built once
        self.routes = {  # HEAD only where GET changes nothing: a link checker's HEAD must
            "/": {"GET": self.show_index, "HEAD": self.show_index},  # not spend a login
            "/auth/mailchimp": {"GET": self.start_login},
            CALLBACK_PATH: {"GET": self.finish_login},
            "/ping": {"POST": self.ping_again},  # they change things: POST, from our pages only
            "/disconnect": {"POST": self.disconnect},
            "/disconnected": {"GET": self.show_disconnected, "HEAD": self.show_disconnected},
            "/favicon.ico": {"GET": no_icon, "HEAD": no_icon},  # browsers ask; we have none
        }

    def show_index(self, visit: Visit) -> Response:
        """Step 1: the start page, or what this browser's connection holds."""
        connection = self.store.load(visit.session) if visit.session else None
        if connection is None:
            return Response(HTTPStatus.OK, self.welcome)
        return Response(HTTPStatus.OK, connected_page(connection, self.notice))

    def start_login(self, visit: Visit) -> Response:
        """Step 2: send the browser to Mailchimp, remembering a fresh state for it."""
        session = visit.session or new_secret()
        state = self.logins.start(session)
        narrate(STEP_AUTHORIZE, f"sending the browser to {self.config.login_url}/oauth2/"
                f"authorize with client_id {self.config.client_id}, redirect_uri "
                f"{self.config.redirect_uri} and a new state ({mask(state)})")
        return redirect(authorize_url(self.config, state),
                        ("Set-Cookie", session_cookie(session, secure=self.secure)))

    def finish_login(self, visit: Visit) -> Response:
        """Steps 3 to 6 (connect), then step 7: keep the connection under a new session id
        (one planted in this browser beforehand is worth nothing now), and leave the
        callback's URL: RFC 6749 §3.1.2.5, the code must not stay in the address bar."""
        offered = dict(urllib.parse.parse_qsl(visit.query)).get("state", "")
        state = self.logins.take(visit.session, offered) if visit.session else ""
        connection = connect(self.opener, self.config, visit.query, state)
        session = new_secret()
        self.store.save(session, connection)
        self.store.delete(visit.session)
        self.logins.transfer(visit.session, session)  # other tabs may still be logging in
        narrate(STEP_KEEP, f"connected to {connection.account_name!r}: kept its token and "
                f"server prefix in {self.store.where}, and sent the browser to / so the code "
                "leaves the address bar")
        return redirect("/", ("Set-Cookie", session_cookie(session, secure=self.secure)),
                        status=HTTPStatus.SEE_OTHER)

    def ping_again(self, visit: Visit) -> Response:
        """Later: call the API with the kept token and server prefix, no new login needed;
        then back to / (so a reload shows the page rather than pinging again)."""
        self.check_same_origin(visit, "ping again")
        connection = self.store.load(visit.session) if visit.session else None
        if connection is None:
            return redirect("/", status=HTTPStatus.SEE_OTHER)
        try:
            health = ping(self.opener, self.config, connection.server_prefix,
                          connection.access_token)
        except FlowError as err:
            if err.mailchimp_status == HTTPStatus.UNAUTHORIZED:  # the user removed the app
                self.store.delete(visit.session)
            raise
        kept = self.store.record_ping(visit.session, utc_now(), health)  # unless disconnected
        renewed = session_cookie(visit.session, secure=self.secure)  # used: 30 more days
        return redirect("/", *([("Set-Cookie", renewed)] if kept else []),
                        status=HTTPStatus.SEE_OTHER)

    def disconnect(self, visit: Visit) -> Response:
        """Forget this browser's connection (Mailchimp has no endpoint to revoke a token)."""
        self.check_same_origin(visit, "disconnect")
        if visit.session:
            self.store.delete(visit.session)
        narrate("disconnect", "forgot this browser's connection; Mailchimp has no endpoint to "
                "revoke the token, so the user removes the app in their account")
        return redirect("/disconnected", ("Set-Cookie", session_cookie(
            "", secure=self.secure, forget=True)), status=HTTPStatus.SEE_OTHER)  # reloads: GET

    def show_disconnected(self, visit: Visit) -> Response:
        """Where Disconnect leads: what was forgotten, and what only the user can revoke."""
        return Response(HTTPStatus.OK, page("Disconnected", DISCONNECTED, self.notice))

    def respond(self, method: str, visit: Visit) -> Response:
        """Answer one request; a failed step becomes its error page."""
        if not self.answers_to(visit.host):
            return Response(HTTPStatus.MISDIRECTED_REQUEST, problem_page(
                HTTPStatus.MISDIRECTED_REQUEST, "This app does not answer to that name.",
                f"Open {self.config.base_url}/ instead.", self.notice),
                note=f"Host {printable(visit.host, 100)!r} is not a name of this app")
        if self.is_loopback_alias(visit.host):  # localhost's cookie would miss the callback
            return redirect(self.config.base_url + visit.path)  # a path: "/", then [!-~]*
        try:
            return dispatch(self.routes, method, visit, self.notice)
        except FlowError as err:
            err.hint = self.hints.get((err.step, err.mailchimp_status)) or in_our_words(err.hint)
            return failure(err, self.notice)
        except StoreError as err:  # a full disk, say: the user gets a page, the server lives on
            step = STORE_STEPS.get(visit.path, "the store")
            return failure(FlowError(err.status, step, str(err)), self.notice)

    def answers_to(self, host_header: str) -> bool:
        """Whether Host names this app: its base URL's host, localhost or an IP address. Any
        other name came through someone's DNS: an attacker's name resolving to 127.0.0.1
        (DNS rebinding) would let their pages read ours, so it gets no page and no cookie."""
        if not host_header or host_header == self.netloc:
            return True  # HTTP/1.0 without Host, or the usual case, answered quickly
        try:
            name = urllib.parse.urlsplit("//" + host_header).hostname or ""
        except ValueError:  # the HTTP layer checked its shape, but not each IPv6 address
            return False
        return name in (self.hostname, "localhost") or is_ip_address(name)

    def is_loopback_alias(self, host_header: str) -> bool:
        """Whether the browser reached us by another loopback name for the same port
        (localhost for 127.0.0.1, say). Only then is Host trusted, and only as a yes or no."""
        if host_header == self.netloc:
            return False  # the name it should be: the usual case, answered quickly
        ours = urllib.parse.urlsplit(self.config.base_url)
        try:
            theirs = urllib.parse.urlsplit("//" + host_header)
            ports = (ours.port or 80, theirs.port or 80)
        except ValueError:
            return False
        return (ours.scheme == "http" and ports[0] == ports[1] and bool(theirs.hostname)
                and theirs.hostname != ours.hostname
                and is_loopback(ours.hostname or "") and is_loopback(theirs.hostname or ""))

    def close(self) -> None:
        """Let go of the store (the server closes its app when it stops)."""
        self.store.close()

    def check_same_origin(self, visit: Visit, action: str) -> None:
        """Refuse a POST that another site's page made (CSRF). Browsers say where a request
        comes from in Sec-Fetch-Site, and in Origin (which our Referrer-Policy lets them fill
        in for our own pages); both, when sent, must name this app. A client that sends
        neither is no current browser, and SameSite=Lax keeps the cookie off old browsers'
        cross-site posts."""
        if visit.fetch_site not in ("", "same-origin") or (
                visit.origin and origin_of(visit.origin) != self.config.base_url):
            raise FlowError(HTTPStatus.FORBIDDEN, CHECK_SAME_ORIGIN,
                            f"This request to {action} came from another site; nothing was "
                            "changed.", f"To {action}, use the button on "
                            f"{self.config.base_url}/.", heading="Refused: another site's button")


CHECK_SAME_ORIGIN = "the same-origin check (CSRF)"
STORE_STEPS = {"/": "step 1 (start page)", CALLBACK_PATH: STEP_KEEP, "/ping": "ping again",
               "/disconnect": "disconnect"}  # what was being done when the store failed

# The core's hints name Config's fields; here they are settings a user of this demo makes.
SETTINGS = {"Config.client_id": "MAILCHIMP_CLIENT_ID",
            "Config.client_secret": "MAILCHIMP_CLIENT_SECRET",
            "Config.login_url": "MAILCHIMP_LOGIN_URL", "Config.api_url": "MAILCHIMP_API_URL",
            "Config.timeout": "--timeout",
            "Config.redirect_uri": "the redirect URI the app prints at start-up"}
DEMO_WORDS = {  # what this demo adds to a core hint that begins so
    HINT_START_AGAIN: "Open the address the app prints: 127.0.0.1 and localhost keep separate "
                      "cookies.",
    HINT_ROTATED_SECRET: "Then restart the app.",
    HINT_REVOKED: "This app has forgotten the token.",
}


def in_our_words(hint: str) -> str:
    """A core hint as this demo says it: with its own advice, and its settings' names."""
    hint = " ".join([hint, *(words for core, words in DEMO_WORDS.items()
                             if hint.startswith(core))])
    for name, setting in SETTINGS.items():
        hint = hint.replace(name, setting)
    return hint


def dispatch(routes: Mapping[str, Mapping[str, Callable[[Visit], Response]]], method: str,
             visit: Visit, notice: str = "") -> Response:
    """Run the route for this path and method; 404 or 405 if there is none."""
    methods = routes.get(visit.path)
    if methods is None:
        return Response(HTTPStatus.NOT_FOUND, problem_page(
            HTTPStatus.NOT_FOUND, "There is no page at this address.", notice=notice))
    action = methods.get(method)
    if action is None:
        allowed = ", ".join(sorted(methods))
        return Response(HTTPStatus.METHOD_NOT_ALLOWED, problem_page(
            HTTPStatus.METHOD_NOT_ALLOWED, f"This address accepts only {allowed}.",
            notice=notice), headers=(("Allow", allowed),))
    return action(visit)


def no_icon(visit: Visit) -> Response:
    """/favicon.ico, which browsers ask for on every page: nothing, and no warning."""
    return Response(HTTPStatus.NO_CONTENT)


def redirect(location: str, *headers: tuple[str, str],
             status: HTTPStatus = HTTPStatus.FOUND) -> Response:
    """A redirect; Location comes from configuration, never from the request."""
    return Response(status, headers=(("Location", location), *headers))


def failure(err: FlowError, notice: str = "") -> Response:
    """A failed step as the error page, with the same words, hint included, for the log."""
    message = f"{err.step[0].upper()}{err.step[1:]} failed: {err.message}"
    return Response(err.status, problem_page(err.status, message, err.hint, notice,
                                             heading=err.heading),
                    note=f"{message} Hint: {err.hint}" if err.hint else message)

LOGIN_LIFETIME = 600.0  # seconds; RFC 6749 §4.1.2 suggests the same 10 minutes for codes
SESSION_LIFETIME = 30 * 24 * 3600  # seconds: a browser unseen this long is forgotten, token too
SESSION_COOKIE = "mailchimp_demo_session"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # the shape new_secret() makes


class PendingLogins:
    """Step 2's states awaiting their callbacks, by browser: single-use, expiring, and
    bounded (the oldest make way), so a flood of logins cannot fill memory."""

    def __init__(self, *, lifetime: float = LOGIN_LIFETIME, browsers: int = 1000,
                 per_browser: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime, self.browsers, self.per_browser = lifetime, browsers, per_browser
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, float]] = {}  # session -> state -> expiry, oldest first

    def start(self, session: str) -> str:
        """A new state for this browser (two tabs may each have one)."""
        state, now = new_secret(), self.clock()
        with self._lock:
            states = {s: t for s, t in self._states.pop(session, {}).items() if t > now}
            states[state] = now + self.lifetime
            self._states[session] = dict(list(states.items())[-self.per_browser:])  # newest
            while len(self._states) > self.browsers:
                del self._states[next(iter(self._states))]
        return state

    def take(self, session: str, offered: str) -> str:
        """The state this browser was given, if the callback offers it in time; only once."""
        with self._lock:
            states = self._states.get(session, {})
            state = next((s for s in states if hmac.compare_digest(s.encode(), offered.encode())),
                         "")
            expiry = states.pop(state, 0.0)
        return state if expiry > self.clock() else ""

    def transfer(self, old: str, new: str) -> None:
        """Carry a browser's other logins in progress over to its new session id."""
        with self._lock:
            if self._states.get(old):
                self._states[new] = self._states.pop(old)


def session_from(cookie_header: str) -> str:
    """The session id in a Cookie header, or "" (a cookie is outside input: check its shape)."""
    for pair in cookie_header.split(";"):
        name, _, value = pair.strip().partition("=")
        if name == SESSION_COOKIE and SESSION_ID.fullmatch(value):
            return value
    return ""


def session_cookie(session: str, *, secure: bool, forget: bool = False) -> str:
    """Set-Cookie for the session: HttpOnly keeps page scripts from reading it; SameSite=Lax
    still sends it when Mailchimp redirects the browser back, but not on cross-site POSTs;
    Secure keeps it off plain HTTP once the app is served over HTTPS; Max-Age lets it go
    when the store lets go of its connection."""
    return (f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; "
            f"Max-Age={0 if forget else SESSION_LIFETIME}" + ("; Secure" if secure else ""))


def is_ip_address(host: str) -> bool:
    """True for an IPv4 or IPv6 address, as opposed to a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------


STYLESHEET = """
body { font: 16px/1.5 system-ui, sans-serif; color: #1f2328; max-width: 40rem;
       margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin: 1rem 0; }
.notice { background: #fff3bf; border: 2px solid #e0a800; border-radius: .4rem;
          padding: .6rem .9rem; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1.2rem; }
dt { font-weight: 600; }
dd { margin: 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       overflow-wrap: anywhere; }
.status { color: #59636e; font-size: .9rem; }
form { display: inline-block; margin: 1rem .5rem 0 0; }
.button, button { font: inherit; display: inline-block; padding: .5rem 1.1rem; cursor: pointer;
                  border: 1px solid #0b5cad; border-radius: .4rem; background: #0b5cad;
                  color: #fff; text-decoration: none; }
button.quiet { background: #fff; color: #0b5cad; }
a:focus-visible, button:focus-visible { outline: 3px solid #1f2328; outline-offset: 3px; }
"""

# The policy allows this one stylesheet by its hash, computed from the text itself, so editing
# the style can't break the policy, and nothing injected into a page can style or script it.
STYLE_HASH = base64.b64encode(hashlib.sha256(STYLESHEET.encode()).digest()).decode()
POLICY = (f"default-src 'none'; style-src 'sha256-{STYLE_HASH}'; form-action 'self'; "
          "frame-ancestors 'none'; base-uri 'none'")


PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title><style>{style}</style></head>
<body>
<main>
{notice}<h1>{title}</h1>
{content}
</main>
</body>
</html>
"""

NOTICE = """<p class="notice">{notice}</p>
"""

WELCOME = """<p>This app connects to a Mailchimp account with OAuth 2. Mailchimp will ask you
to log in and to approve access; then you come back here.</p>
<p><a class="button" href="/auth/mailchimp">Connect with Mailchimp</a></p>"""

CONNECTED = """<p>Mailchimp accepted the connection. What the app keeps:</p>
<dl>
<dt>Account</dt><dd>{account}</dd>
<dt>Server prefix</dt><dd><code>{prefix}</code></dd>
<dt>Access token</dt><dd><code>{token}</code> (masked: it never appears in full)</dd>
<dt>Connected at</dt><dd>{connected_at}</dd>
<dt>Last ping</dt><dd>{pinged_at}: {health}</dd>
</dl>
<form method="post" action="/ping"><input type="hidden" name="do" value="ping">
<button type="submit">Ping Mailchimp again</button></form>
<form method="post" action="/disconnect"><input type="hidden" name="do" value="disconnect">
<button class="quiet" type="submit">Disconnect</button></form>"""

DISCONNECTED = """<p>This app has forgotten the access token and the server prefix.</p>
<p>The token itself keeps working until the user revokes it, and Mailchimp has no endpoint for
that: to take this app's access away entirely, remove the app in your Mailchimp account.</p>
<p><a href="/">Back to the start</a></p>"""

PROBLEM = """<p class="status">{status}</p>
<p>{message}</p>
<p>{hint}</p>
<p><a href="{home}">Back to the start</a></p>"""

# What a problem page says first, above its status: what happened, in words.
HEADINGS = {
    HTTPStatus.BAD_REQUEST: "This request could not be used",
    HTTPStatus.FORBIDDEN: "Nothing was changed",
    HTTPStatus.NOT_FOUND: "There is no page here",
    HTTPStatus.METHOD_NOT_ALLOWED: "Not at this address",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "Too much was sent",
    HTTPStatus.MISDIRECTED_REQUEST: "Not this app's address",
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: "Too much was sent",
    HTTPStatus.INTERNAL_SERVER_ERROR: "Something went wrong",
    HTTPStatus.BAD_GATEWAY: "Mailchimp's answer could not be used",
    HTTPStatus.SERVICE_UNAVAILABLE: "Busy for a moment",
    HTTPStatus.GATEWAY_TIMEOUT: "Mailchimp did not answer in time",
}


def render(template: str, **values: str) -> str:
    """Fill a template, escaping every value: nothing from outside becomes markup."""
    return template.format(**{name: html.escape(value) for name, value in values.items()})


def page(title: str, content: str, notice: str = "") -> bytes:
    """A whole page around content that is already markup (made by render)."""
    return PAGE.format(title=html.escape(title), content=content, style=STYLESHEET,
                       notice=render(NOTICE, notice=notice) if notice else "").encode("utf-8")


def connected_page(connection: Connection, notice: str = "") -> bytes:
    """Step 1, once this browser has connected: what the app knows, token masked."""
    return page("Connected to Mailchimp", render(
        CONNECTED, account=connection.account_name, prefix=connection.server_prefix,
        token=mask(connection.access_token), connected_at=connection.connected_at,
        pinged_at=connection.pinged_at, health=connection.health_status), notice)


def problem_page(status: HTTPStatus, message: str, hint: str = "", notice: str = "", *,
                 heading: str = "", home: str = "/") -> bytes:
    """The one error page: what happened, what went wrong, and what to do about it."""
    return page(heading or HEADINGS.get(status, status.phrase), render(
        PROBLEM, status=f"{status.value} {status.phrase}", message=message, hint=hint,
        home=home), notice)


# ---------------------------------------------------------------------------
# The store: step 7's connections, one row each, in SQLite
# ---------------------------------------------------------------------------


class StoreError(Exception):
    """The store can't be opened, read or written; what it holds is left as it was."""

    def __init__(self, message: str,
                 status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR) -> None:
        super().__init__(message)
        self.status = status

STORE_ID, STORE_VERSION = 0x4D434F41, 1  # PRAGMA application_id ("MCOA") and user_version
SCHEMA = (
    """CREATE TABLE connections (
        session       TEXT PRIMARY KEY,  -- the browser's session cookie
        access_token  TEXT NOT NULL,     -- a real app encrypts it and keys rows by its user id
        server_prefix TEXT NOT NULL,
        account_name  TEXT NOT NULL,
        connected_at  TEXT NOT NULL,
        pinged_at     TEXT NOT NULL,
        health_status TEXT NOT NULL,
        last_used     REAL NOT NULL      -- Unix time of the login or the last ping
    )""",
    "CREATE INDEX connections_by_last_used ON connections (last_used)",
    f"PRAGMA application_id = {STORE_ID}",
    f"PRAGMA user_version = {STORE_VERSION}",
)
COLUMNS = "access_token, server_prefix, account_name, connected_at, pinged_at, health_status"


class Store:
    """Connections, one row each, in SQLite: in memory, or in a file that survives restarts
    and that several processes can share. Every change is one statement."""

    def __init__(self, path: str = ":memory:", *, busy_timeout: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path if path == ":memory:" else os.path.abspath(path)
        self.where = "memory" if path == ":memory:" else self.path  # for the log and banner
        self.clock = clock
        self._lock = threading.Lock()  # one database connection, shared by request threads
        if self.path != ":memory:":
            claim_file(self.path)
        # busy_timeout: how long to wait while another process writes
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._open(busy_timeout)
        except sqlite3.Error as err:
            self._db.close()
            raise StoreError(f"{self.path} is not a store this app can use ({err}); it was "
                             "left as it is: move it aside or choose another --store") from err

    def _open(self, busy_timeout: float) -> None:
        """Take the write lock (an unwritable store fails now, not at a login); under it,
        refuse a file that is not this app's store, or set up a new one; tidy; then WAL."""
        self._db.execute("PRAGMA quick_check").fetchall()  # a damaged or truncated file fails
        self._db.execute("BEGIN IMMEDIATE")  # one process at a time sets up a new file
        try:
            if self._is_new():
                for statement in SCHEMA:
                    self._db.execute(statement)
            self._db.execute("DELETE FROM connections WHERE last_used < ?", (self._oldest(),))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        deadline = time.monotonic() + busy_timeout
        while True:  # readers don't wait for a writer. Switching needs the file to itself, and
            try:  # SQLite refuses at once, not after busy_timeout, if another process is mid-way
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        """Let go of the database (the server's close and main call this)."""
        with self._lock:
            self._db.close()

    def _is_new(self) -> bool:
        """True for an empty database, False for this app's; anything else is refused."""
        identity = [self._db.execute(query).fetchone()[0] for query in (
            "PRAGMA application_id", "PRAGMA user_version", "SELECT count(*) FROM sqlite_master")]
        if identity == [0, 0, 0]:
            return True
        if identity[:2] != [STORE_ID, STORE_VERSION]:
            raise sqlite3.DatabaseError("it is another program's database, or another "
                                        "version of this one's")
        return False

    def _oldest(self) -> float:
        """The last_used before which a connection has expired."""
        return self.clock() - SESSION_LIFETIME

    def _run(self, statement: str, *values: object) -> tuple[int, list[Any]]:
        """One statement, its own transaction: the rows it changed, and those it found."""
        try:
            with self._lock:
                cursor = self._db.execute(statement, values)
                return cursor.rowcount, cursor.fetchall()
        except sqlite3.OperationalError as err:
            busy = "locked" in str(err)  # another process kept the store past busy_timeout
            raise StoreError(f"{self.path}: {err}", HTTPStatus.SERVICE_UNAVAILABLE if busy
                             else HTTPStatus.INTERNAL_SERVER_ERROR) from err
        except sqlite3.Error as err:
            raise StoreError(f"{self.path}: {err}") from err

    def load(self, session: str) -> Connection | None:
        """This browser's connection, unless it has expired."""
        _, rows = self._run(f"SELECT {COLUMNS} FROM connections WHERE session = ? "
                            "AND last_used >= ?", session, self._oldest())
        if not rows:
            return None
        row = rows[0]  # checked as closely as Mailchimp's reply: the prefix goes into a URL
        if not (all(isinstance(value, str) for value in row) and ACCESS_TOKEN.fullmatch(row[0])
                and SERVER_PREFIX.fullmatch(row[1])):
            raise StoreError(f"{self.path} holds an impossible token or server prefix")
        return Connection(*row)

    def save(self, session: str, connection: Connection) -> None:
        """Keep a new connection, and let go of any that have expired."""
        self._run(f"INSERT INTO connections (session, {COLUMNS}, last_used) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", session, *astuple(connection), self.clock())
        self._run("DELETE FROM connections WHERE last_used < ?", self._oldest())

    def record_ping(self, session: str, pinged_at: str, health_status: str) -> bool:
        """Note a ping's answer, only if the connection is still there (a Disconnect made
        while the ping was on its way stays done); whether it was."""
        changed, _ = self._run("UPDATE connections SET pinged_at = ?, health_status = ?, "
                               "last_used = ? WHERE session = ?", pinged_at, health_status,
                               self.clock(), session)
        return changed == 1

    def delete(self, session: str) -> None:
        """Forget this browser's connection, if it has one."""
        self._run("DELETE FROM connections WHERE session = ?", session)


def claim_file(path: str) -> None:
    """Create the store file readable by its owner only (SQLite gives its -wal and -shm the
    same mode), or check an existing one: it holds access tokens, so refuse it, or a -wal or
    -shm beside it, if another user owns it or can read it. An empty file of our own (as
    `touch` makes) holds nothing yet: take it. A symbolic link is refused: what is checked
    must be what SQLite opens."""
    if os.path.islink(path):
        raise StoreError(f"{path} is a symbolic link: give --store the file it points to")
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            info = os.fstat(handle)
            if os.name == "posix" and info.st_size == 0 and info.st_uid == os.geteuid():
                os.fchmod(handle, 0o600)
                info = os.fstat(handle)
        finally:
            os.close(handle)
        beside = [(name, os.lstat(name)) for name in (path + "-wal", path + "-shm")
                  if os.path.lexists(name)]
    except OSError as err:
        raise StoreError(f"cannot open {path}: {err.strerror}") from err
    for problem in [exposure(path, info), *(exposure(name, i) for name, i in beside)]:
        if problem:
            raise StoreError(f"{problem}; it was left as it is")


def exposure(path: str, info: os.stat_result) -> str:
    """How another user could read or change the file at path, or "" if only its owner can."""
    if os.name != "posix":
        return ""  # on Windows, a file in the user's own folders is theirs alone
    if not stat.S_ISREG(info.st_mode):
        return f"{path} holds access tokens, but it is not a regular file"
    if info.st_uid != os.geteuid():
        return f"{path} holds access tokens, but another user owns it"
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} holds access tokens, but other users can read or write it: "
                f"run chmod 600 {path}")
    return ""


# ---------------------------------------------------------------------------
# Serving HTTP: a request in, a Visit to the app, its Response out
# ---------------------------------------------------------------------------


SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),  # pages hold account data, URLs hold codes: never cache
    # The callback URL holds the code: no other site is told it. Our own forms still carry
    # their real Origin (under no-referrer a browser sends "Origin: null", even to us).
    ("Referrer-Policy", "same-origin"),
    ("X-Content-Type-Options", "nosniff"),  # the browser believes our Content-Type, not a guess
    ("Content-Security-Policy", POLICY),  # no scripts, frames or foreign forms; our style only
)


class Handler(http.server.BaseHTTPRequestHandler):
    """Reads a request into a Visit, asks the server's app, and sends the Response it gets."""

    protocol_version = "HTTP/1.1"  # keep-alive, as browsers expect
    default_request_version = "HTTP/1.0"  # not 0.9: a garbled request still gets our headers
    # Buffered, so headers and body leave in one write when http.server flushes after each
    # request: two small writes on a kept-alive connection wait 40 ms for Nagle and delayed ACK.
    wbufsize = 64 * 1024
    server: Server
    raw_requestline: bytes

    def setup(self) -> None:
        """http.server's streams, with input under the limits of RequestInput; with TLS, the
        handshake first, within the time a request has (plain HTTP here fails it: no page)."""
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.server.request_timeout)
            self.request.do_handshake()  # an SSLError or a timeout: one DEBUG line
        self.connection = self.request
        self.input = RequestInput(self.connection, self.server.request_timeout)
        self.rfile = RequestReader(self.input)
        self.wfile = self.connection.makefile("wb", self.wbufsize)
        self.answering = False  # between reading a request and sending its answer
        self.wants_continue = False  # it sent "Expect: 100-continue"
        self.server.handlers.add(self)

    def finish(self) -> None:
        self.server.handlers.discard(self)
        super().finish()

    def handle_one_request(self) -> None:
        """http.server's, with the clock started and a head it must not parse refused."""
        self.input.expect_request()
        try:
            super().handle_one_request()
        except BadHead as err:
            self.command, self.request_version = "", self.default_request_version
            self.refuse(err.status, str(err))

    def parse_request(self) -> bool:
        """http.server's parsing, between checks of what it lets through: the request line
        before, the head after; nothing for a client that hung up half-way through its head
        (there is no one to answer)."""
        self.wants_continue = False
        strict = REQUEST_LINE.fullmatch(self.raw_requestline) is not None
        parsed = strict and not self.input.hung_up and super().parse_request()
        self.input.head_read()
        if self.input.hung_up:
            self.close_connection = True
            logger.debug("%s%s hung up mid-request", self.server.label, self.client_address[0])
            return False
        if not strict:
            self.command, self.request_version = "", self.default_request_version
            self.refuse(HTTPStatus.BAD_REQUEST, "the request line is not METHOD /path HTTP/x.y")
            return False
        status, problem = head_problem(self.headers, self.request_version) if parsed else (
            HTTPStatus.OK, "")
        if problem:
            self.refuse(status, problem)
        elif parsed and self.wants_continue:  # only now: the body it would send is wanted
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
            self.wfile.flush()  # in the write buffer, it would wait until the client gave up
        return parsed and not problem

    def handle_expect_100(self) -> bool:
        """http.server asks this while parsing; parse_request answers once the head is checked."""
        self.wants_continue = True
        return True

    def answer(self) -> None:
        """Turn the request into a Visit and send the app's Response, all before a stop."""
        length = int(self.headers.get("Content-Length", "0"))  # small: parse_request saw
        body = self.rfile.read(length)
        self.input.request_read()
        if len(body) < length:  # no whole request to answer: the client hung up mid-body
            self.close_connection = True
            logger.debug("%s%s hung up mid-body", self.server.label, self.client_address[0])
            return
        path, _, query = self.path.partition("?")
        visit = Visit(path, query,
                      session=session_from("; ".join(self.headers.get_all("Cookie") or [])),
                      form=form_of(self.headers, body),
                      authorization=self.headers.get("Authorization", ""),
                      host=self.headers.get("Host", "").strip(" \t"),
                      origin=self.headers.get("Origin", ""),
                      fetch_site=self.headers.get("Sec-Fetch-Site", ""))
        self.answering = True  # a stop waits for this answer
        try:
            response = self.server.app.respond(self.command, visit)
        except Exception:  # a bug: the operator gets the traceback, the browser a plain page
            logger.exception("%sbug while answering %s %s", self.server.label,
                             printable(self.command, 20), printable(path, 100))
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, problem_page(
                HTTPStatus.INTERNAL_SERVER_ERROR, "Something went wrong inside this app; the "
                "details are in its log."), note="see the traceback above")
        try:
            self.deliver(response)
            self.wfile.flush()
        finally:
            self.answering = False

    do_GET = do_HEAD = do_POST = answer  # the app decides what each method may do

    def deliver(self, response: Response) -> None:
        """Status, headers and body in one go; for HEAD, everything but the body."""
        self.log_response(response)
        own = {name for name, _ in response.headers}  # a route may set its own policy
        self.send_response_only(response.status)
        self.send_header("Date", self.date_time_string())
        for name, value in (*[h for h in SECURITY_HEADERS if h[0] not in own], *response.headers):
            self.send_header(name, value)
        if response.status != HTTPStatus.NO_CONTENT:  # RFC 9110 §8.6: no length on a 204
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":  # it asked to keep the connection: say yes
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (malformed request, unknown method, ...) as our page.
        Its message can quote the request line, query string and all, so it is not shown."""
        self.refuse(HTTPStatus(code), "http.server refused the request")

    def refuse(self, status: HTTPStatus, why: str) -> None:
        """Refuse a request we could not read, and close: the stream can't be trusted now."""
        self.close_connection = True
        self.deliver(Response(status, problem_page(status, status.description), note=why))

    def log_response(self, response: Response) -> None:
        """One line a request: who, what, the status, and why; never the query string.
        A failure is a warning; a success is DEBUG, since the steps tell the story."""
        level = logging.WARNING if response.status >= HTTPStatus.BAD_REQUEST else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        target = f"{printable(self.command, 20)} {printable(self.path.partition('?')[0], 100)}" \
            if self.command else "(unreadable request)"
        logger.log(level, "%s%s %s -> %d%s", self.server.label, self.client_address[0],
                   target, response.status, f" {response.note}" if response.note else "")

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own messages; only "Request timed out" on an idle connection is left."""
        logger.debug("%s%s %s", self.server.label, self.client_address[0],
                     printable(format % args))


def form_of(headers: email.message.Message, body: bytes) -> dict[str, str] | None:
    """The body's fields, if it is a urlencoded form we can read."""
    if headers.get_content_type() != "application/x-www-form-urlencoded":
        return None
    try:
        return parse_fields(body.decode("ascii"))
    except ValueError:  # not ASCII, repeated or too many fields: not a form we can read
        return None


class App(Protocol):
    """What a Server serves: the OAuthDemo, or the sandbox's stand-in for Mailchimp."""

    def respond(self, method: str, visit: Visit) -> Response: ...

    def close(self) -> None: ...


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, every request answered by one app, within bounds: at most
    max_connections at once, each request given request_timeout seconds to arrive."""

    daemon_threads = True  # a stop doesn't wait for idle keep-alive connections
    request_queue_size = 1024  # the listen backlog: a burst of browsers waits, not refused
    app: App

    def __init__(self, address: tuple[str, int], *, request_timeout: float = 10.0,
                 max_connections: int = 0, label: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        self.host = address[0]
        self.tls = tls
        self.request_timeout = request_timeout
        self.label = label  # a prefix for its log lines
        self.max_connections = max_connections or connection_cap()
        self.connections = 0
        self.full = False  # reached max_connections, and not yet back down to half of it
        self.cutting = False  # has cut off a slow request head since it was full
        self.room = threading.Condition()  # notified when a connection closes
        self.handlers: set[Handler] = set()  # one per open connection
        if ":" in self.host:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        if tls:  # each connection's handshake happens in its own thread (Handler.setup)
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection if there is room; if not, new ones wait in the backlog (this
        waits for room half a second at a time, so that a stop is heard, and never spins)."""
        with self.room:
            if self.connections >= self.max_connections:
                self.make_room()
            if not self.room.wait_for(lambda: self.connections < self.max_connections, 0.5):
                raise OSError("no room for another connection")  # serve_forever tries again
            request = super().get_request()
            self.connections += 1
            if self.connections == self.max_connections and not self.full:
                self.full = True  # said once for a siege, not at each connection it replaces
                logger.warning("%sserving %d connections, the most it will; new ones wait",
                               self.label, self.max_connections)
        return request

    def make_room(self) -> None:
        """Full, with a newcomer waiting (serve_forever calls get_request only then): cut off
        the connection whose request head has been arriving the longest, if for over a second
        (a slowloris holds its place this way; a browser's head takes milliseconds). A request
        whose head is in is never cut off."""
        slowest = min(self.handlers, key=lambda handler: handler.input.head_waiting_since(),
                      default=None)
        if slowest and slowest.input.head_waiting_since() < time.monotonic() - 1:
            slowest.input.cut_off()
            if not self.cutting:
                self.cutting = True  # said once for a siege, like being full
                logger.warning("%scutting off the slowest unfinished requests to let new "
                               "connections in", self.label)

    def close_request(self, request: Any) -> None:
        super().close_request(request)
        with self.room:
            self.connections -= 1
            if self.full and self.connections <= self.max_connections // 2:
                self.full = self.cutting = False
                logger.warning("%sdown to %d connections", self.label, self.connections)
            self.room.notify()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or resets mid-request is no news: one DEBUG line. Anything
        else is a bug, and its traceback goes to the log."""
        if isinstance(sys.exc_info()[1], OSError):
            logger.debug("%s%s went away: %s", self.label, client_address[0], sys.exc_info()[1])
        else:
            logger.exception("%sbug while serving %s", self.label, client_address[0])

    def stop(self, seconds: float) -> bool:
        """After server_close (no new connections): give the requests being answered up to
        seconds to finish, then close the app; whether they all finished."""
        finished = self.finish_requests(seconds)
        self.app.close()
        return finished

    def finish_requests(self, seconds: float) -> bool:
        """Wait for the requests being answered, up to seconds; whether they all finished.
        (It looks every 20 ms: a lock taken for every request would cost every request.)"""
        deadline = time.monotonic() + seconds
        while any(handler.answering for handler in list(self.handlers)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def server_bind(self) -> None:
        """Bind, skipping http.server's reverse DNS lookup of our own address: nothing here
        uses the name, and a resolver that never answers would hold up start-up for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.host, self.server_address[1]

    @property
    def origin(self) -> str:
        """http://host:port (https:// with TLS), with the port actually bound."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.server_port}"


def make_server(config: Config, *, host: str = "127.0.0.1", port: int = 3000,
                opener: Opener | None = None, store: Store | None = None,
                logins: PendingLogins | None = None, request_timeout: float = 10.0,
                max_connections: int = 0, notice: str = "",
                tls: ssl.SSLContext | None = None) -> tuple[Server, OAuthDemo]:
    """Bind (port 0 picks a free port), then build the app for the address actually bound."""
    server = Server((host, port), request_timeout=request_timeout,
                    max_connections=max_connections, tls=tls)
    server.app = app = OAuthDemo(
        replace(config, base_url=config.base_url or server.origin),
        opener=opener or new_opener(),
        store=store or Store(), logins=logins or PendingLogins(), notice=notice)
    return server, app


# ---------------------------------------------------------------------------
# The limits: what no request may do (a first reading can skip this section)
# ---------------------------------------------------------------------------

MAX_BODY_BYTES = 16 * 1024  # the only bodies are forms of a few fields
MAX_HEAD_BYTES = 32 * 1024  # request line and headers; a browser's are 1 to 8 KiB

# RFC 9112 §3: a method, one space, a path (absolute URLs are for proxies, and "@evil/" would
# end up in a Location), one space, the version. str.split() also splits at \x85 and \xa0.
REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ /[!-~]* HTTP/[0-9]\.[0-9]\r?\n")
HOST = re.compile(r"[A-Za-z0-9._-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


class BadHead(Exception):
    """A request head refused before http.server parses it: the status, and why."""

    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


class RequestInput(io.RawIOBase):
    """A connection's input, under two limits for each request: all of it must arrive by a
    deadline, however slowly the bytes trickle in (slowloris), and its head within
    MAX_HEAD_BYTES, however many header lines a client sends."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock, self.seconds, self.timeout = sock, seconds, seconds
        self.sock.settimeout(seconds)
        self.started = self.deadline = 0.0
        self.head_left = -1  # bytes the head may still take; -1 while no head is being read
        self.hung_up = False  # the client closed the connection with its head unfinished

    def expect_request(self) -> None:
        """The clock starts: for the first request, at connect; then, at the last answer."""
        self.started = time.monotonic()
        self.deadline, self.head_left = self.started + self.seconds, MAX_HEAD_BYTES
        self.hung_up = False

    def head_read(self) -> None:
        self.head_left = -1

    def request_read(self) -> None:
        self.deadline = math.inf
        if self.timeout != self.seconds:
            self.timeout = self.seconds
            self.sock.settimeout(self.seconds)  # for writing the answer

    def head_waiting_since(self) -> float:
        """When the request head still being read began to arrive; inf if none is."""
        return self.started if self.head_left >= 0 else math.inf

    def cut_off(self) -> None:
        """Read no more: the server needs this connection's place. (An answer being written,
        if the head has arrived after all, still goes out.)"""
        with contextlib.suppress(OSError):  # the connection has closed meanwhile
            self.sock.shutdown(socket.SHUT_RD)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            # http.server closes the connection; on Python 3.9 it catches only socket.timeout
            raise socket.timeout("the request did not arrive in time")  # noqa: UP041
        if self.head_left == 0:
            raise BadHead(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          f"a request head over {MAX_HEAD_BYTES} bytes")
        if left < self.timeout - 1:  # near the deadline, no read may outlast it (by over 1 s;
            self.timeout = left  # settimeout lets go of the GIL: too dear for every read)
            self.sock.settimeout(left)
        size = len(buffer) if self.head_left < 0 else min(len(buffer), self.head_left)
        received = self.sock.recv_into(buffer, size)  # counting what arrives with the head
        if self.head_left >= 0:
            self.head_left -= received
            self.hung_up = received == 0
        return received


class RequestReader(io.BufferedReader):
    """A connection's input as http.server reads it, with each line of a request head refused
    if it holds a CR that does not end it: Python's header parser takes a lone CR for the end
    of the head and drops the rest (CPython issue 114782), so a hidden header goes unseen."""

    def readline(self, size: int | None = -1, /) -> bytes:
        line = io.BufferedReader.readline(self, size)  # not super(): it runs for every line
        # No CR but the one just before the LF. (A line with no LF is the last of a client
        # that hung up: no one is answered.)
        if line.find(b"\r") not in (-1, len(line) - 2):
            raise BadHead(HTTPStatus.BAD_REQUEST, "a bare CR in the request head")
        return line


def head_problem(headers: email.message.Message, version: str) -> tuple[HTTPStatus, str]:
    """Why a request is refused once its head is read, and with what status; "" if it is not."""
    names = [name.lower() for name in headers]  # once: these checks run for every request
    problem = framing_problem(headers, names) or host_problem(headers, names, version)
    if problem:
        return HTTPStatus.BAD_REQUEST, problem
    if int(headers.get("Content-Length", "0")) > MAX_BODY_BYTES:  # before "100 Continue"
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body over {MAX_BODY_BYTES} bytes"
    return HTTPStatus.OK, ""


def framing_problem(headers: email.message.Message, names: list[str]) -> str:
    """Why a request's length is ambiguous (RFC 9112 §5, §6.3), or "". Two readers of one
    ambiguous request can disagree on where it ends: the rest is smuggled in as another."""
    if headers.defects:  # a line with no colon, or a space before it: the parser stopped there
        return "a header line is malformed"
    if any("\n" in value for value in headers.values()):
        return "a header is folded over two lines"
    lengths = [length.strip(" \t") for length in headers.get_all("Content-Length") or []
               ] if "content-length" in names else []
    if len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,9}", length) for length in lengths):
        return "Content-Length is repeated or not a number"
    if "transfer-encoding" in names:
        return "Transfer-Encoding is not accepted on requests"
    return ""


def host_problem(headers: email.message.Message, names: list[str], version: str) -> str:
    """Why Host is unusable, or "": RFC 9112 §3.2 refuses an HTTP/1.1 request without one,
    with two (which would name the app?), or with one that is no host[:port]."""
    hosts = names.count("host")
    if hosts > 1:
        return "Host is repeated"
    if not hosts:
        return "an HTTP/1.1 request has no Host" if version >= "HTTP/1.1" else ""
    return "" if HOST.fullmatch(headers["Host"].strip(" \t")) else "Host is not a host[:port]"


def connection_cap() -> int:
    """How many connections to serve at once: each can hold three open files (its socket,
    one to Mailchimp and, in the sandbox, the stand-in's end of that), and 64 are kept for
    the store, the log and Python. Past the open-file limit, accept() fails in a busy loop."""
    try:
        import resource  # POSIX only
    except ImportError:
        return 500
    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1000 if files == resource.RLIM_INFINITY else max(4, min(1000, (files - 64) // 3))


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


ENVIRONMENT = """environment:
  MAILCHIMP_CLIENT_ID      your app's client_id, from Mailchimp's Registered Apps
  MAILCHIMP_CLIENT_SECRET  the client_secret shown with it
  MAILCHIMP_LOGIN_URL      OAuth endpoints (default https://login.mailchimp.com)
  MAILCHIMP_API_URL        API (default https://{dc}.api.mailchimp.com/3.0)"""


def config_from_env(environ: Mapping[str, str], *, base_url: str = "",
                    timeout: float = 10.0) -> Config:
    """Read the client credentials, and where Mailchimp is, from environment variables
    (checked first under the names the user set, so that a refusal names them)."""
    urls = {name: environ.get(name, default).rstrip("/") for name, default in (
        ("MAILCHIMP_LOGIN_URL", LOGIN_URL), ("MAILCHIMP_API_URL", API_URL))}
    for name, url in urls.items():
        check_upstream_url(name, url, server_prefix=name == "MAILCHIMP_API_URL")
    return Config(client_id=required(environ, "MAILCHIMP_CLIENT_ID"),
                  client_secret=required(environ, "MAILCHIMP_CLIENT_SECRET"),
                  base_url=check_base_url(base_url, "--base-url") if base_url else "",
                  login_url=urls["MAILCHIMP_LOGIN_URL"], api_url=urls["MAILCHIMP_API_URL"],
                  timeout=timeout)


def required(environ: Mapping[str, str], name: str) -> str:
    """One environment variable that must be set."""
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: copy it from Mailchimp's Registered Apps "
                          "page, or try --sandbox first")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """--host, --port, --base-url, --timeout, --store, --quiet or --verbose, and --sandbox."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                     epilog=ENVIRONMENT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=3000,
                        help="port to listen on; 0 picks one (default 3000)")
    parser.add_argument("--base-url", default="",
                        help="where browsers reach this app (default http://HOST:PORT)")
    parser.add_argument("--timeout", type=positive_seconds, default=10.0,
                        help="seconds each call to Mailchimp may take: to connect, for "
                        "each wait for data, and for the whole reply body (default 10)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="serve HTTPS with this certificate (PEM; with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--store", metavar="PATH",
                        help="keep connections in this SQLite database, across restarts "
                        "(default: in memory)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true",
                          help="log warnings only, not each step of a login")
    loudness.add_argument("--verbose", action="store_true",
                          help="also log every request, the stand-in's included")
    if SANDBOX:
        parser.add_argument("--sandbox", action="store_true",
                            help="run against a stand-in for Mailchimp on this machine")
    return parser.parse_args(argv)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """--tls-cert and --tls-key (the names of Python 3.14's http.server) as a server's TLS
    settings, or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together: the certificate and its key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 or newer, safe defaults
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot use --tls-cert {cert} with --tls-key {key}: "
                          f"{err.strerror or err}") from err
    return context


def port_number(text: str) -> int:
    """argparse type for a TCP port (0 lets the system pick one)."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {text}")
    return int(text)


def positive_seconds(text: str) -> float:
    """argparse type for a timeout: more than nothing, less than forever."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 300 seconds, "
                                         f"not {text}")
    return value

STOP_SECONDS = 5.0  # how long a stop waits for the requests being answered


# --sandbox: the section at the end of this file sets it; a copy without that section has none.
SANDBOX: Callable[[argparse.Namespace, Store, ssl.SSLContext | None],
                  tuple[Server, OAuthDemo]] | None = None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    """Run the demo until Ctrl+C; exit status 2 for a setting that is missing or unsafe."""
    args = parse_args(argv)
    try:
        server, app = start(args, environ)
    except (ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the port is taken, or the address isn't this machine's
        hint = ": is the app running already? Choose another port with --port" \
            if err.errno == errno.EADDRINUSE else ""
        print(f"error: cannot listen on {args.host} port {args.port}: {err.strerror}{hint}",
              file=sys.stderr)
        return 2
    stop_on_signals(server)
    print_banner(server, app)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.WARNING if args.quiet else
                    logging.DEBUG if args.verbose else logging.INFO)
    server.serve_forever(poll_interval=0.1)  # how soon it notices a stop
    server.server_close()  # new connections are refused from here on
    print("stopping: finishing the requests being answered", flush=True)
    if not server.stop(STOP_SECONDS):
        print(f"requests still unanswered after {STOP_SECONDS:g} s were dropped")
    print("stopped", flush=True)
    return 0


def stop_on_signals(server: Server) -> None:
    """Ctrl+C and SIGTERM (systemd, docker) end serve_forever in order: through
    server.shutdown(), from a thread of its own as it must be, and not by raising
    KeyboardInterrupt into whatever the main thread was doing (raised inside a weakref
    callback, say, it is printed and lost, and the server never stops)."""
    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def print_banner(server: Server, app: OAuthDemo) -> None:
    """What a newcomer needs at start-up: where to go, and what to register at Mailchimp."""
    listening = "" if server.origin == app.config.base_url else (
        f"  listening on:              {server.origin}/ (browsers use the address above)\n")
    print(f"Mailchimp OAuth 2 demo, listening. Press Ctrl+C to stop.\n"
          f"  open in your browser:      {app.config.base_url}/\n{listening}"
          + ("  redirect URI (stand-in):   " if app.notice else "  redirect URI to register:  ")
          + f"{app.config.redirect_uri}\n"
          f"  Mailchimp login server:    {app.config.login_url}\n"
          f"  connections kept in:       {app.store.where}", flush=True)
    if app.notice:
        print(app.notice, flush=True)


def start(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Server, OAuthDemo]:
    """The store, then the server and app the options ask for (the store closed again if
    they can't be had)."""
    if not is_loopback(args.host) and not args.base_url:
        raise ConfigError(f"--host {args.host} is reachable from other machines, so it "
                          "needs --base-url https://...: the address browsers use")
    tls = tls_context(args.tls_cert, args.tls_key)
    store = Store(args.store) if args.store else Store()
    try:
        if SANDBOX and args.sandbox:
            return SANDBOX(args, store, tls)
        config = config_from_env(environ, base_url=args.base_url, timeout=args.timeout)
        return make_server(config, host=args.host, port=args.port, store=store, tls=tls)
    except BaseException:
        store.close()
        raise


# Sandbox: a stand-in for Mailchimp, for --sandbox
#
# Not Mailchimp, and not part of the flow above: login.mailchimp.com and the
# Marketing API in miniature, on 127.0.0.1, strict where Mailchimp is strict,
# so the unchanged flow can run offline over real sockets. Copying this file
# into a project? Delete from this banner down to "End of the sandbox": the
# rest runs as before, without --sandbox.
# ===========================================================================

SANDBOX_NOTICE = ("SANDBOX: a stand-in for Mailchimp answers here, on this machine. "
                  "This is not Mailchimp, and nothing leaves 127.0.0.1.")
SANDBOX_RESTARTED = ("The stand-in started afresh with the app, so it no longer knows this "
                     "token, and the app has let go of it too. Connect again.")
SANDBOX_PREFIX = "sandbox1"
TOKEN_FIELDS = {"grant_type", "client_id", "client_secret", "redirect_uri", "code"}

CONSENT = """<p>The app <b>{client_id}</b> wants to access the Mailchimp account
<b>Sandbox Account</b>. It will come back to <code>{redirect_uri}</code>.</p>
"""

CONSENT_FORM = """<form method="post" action="/oauth2/authorize">
{fields}<button type="submit" name="decision" value="allow">Allow</button>
<button class="quiet" type="submit" name="decision" value="deny">Deny</button>
</form>"""

HIDDEN = """<input type="hidden" name="{name}" value="{value}">
"""


class Sandbox:
    """The stand-in: one registered app, one account, codes and tokens kept in memory."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.client_id = "sandbox-" + secrets.token_hex(4)
        self.client_secret = new_secret()
        self.redirect_uri = ""  # registered once the app knows its own address
        self.clock = clock
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[str, float]] = {}  # code -> (redirect_uri, expiry)
        self._tokens: set[str] = set()
        self.routes = {
            "/oauth2/authorize": {"GET": self.consent, "POST": self.decide},
            "/oauth2/token": {"POST": self.token},
            "/oauth2/metadata": {"GET": self.metadata},
            f"/{SANDBOX_PREFIX}/3.0/ping": {"GET": self.ping},
        }

    def close(self) -> None:
        """Nothing to let go of: codes and tokens live in memory."""

    def environ(self) -> dict[str, str]:
        """The settings that point the app here, exactly as a user would set them."""
        return {"MAILCHIMP_CLIENT_ID": self.client_id,
                "MAILCHIMP_CLIENT_SECRET": self.client_secret,
                "MAILCHIMP_LOGIN_URL": self.url, "MAILCHIMP_API_URL": self.url + "/{dc}/3.0"}

    def respond(self, method: str, visit: Visit) -> Response:
        """Answer one request; a bad authorize request gets a page, never a redirect."""
        try:
            return dispatch(self.routes, method, visit, SANDBOX_NOTICE)
        except FlowError as err:  # its link leads back to the app, not to the stand-in's /
            return Response(err.status, problem_page(
                err.status, err.message, notice=SANDBOX_NOTICE,
                home=origin_of(self.redirect_uri) + "/"), note=err.message)

    def consent(self, visit: Visit) -> Response:
        """Authorize: check the request, then ask the user (Mailchimp asks them to log in too)."""
        try:
            fields = parse_fields(visit.query)
        except ValueError as err:
            raise FlowError(HTTPStatus.BAD_REQUEST, "", f"Unreadable request: {err}.") from err
        self.check_authorization(fields)
        hidden = "".join(render(HIDDEN, name=name, value=value) for name, value in fields.items())
        content = (render(CONSENT, client_id=self.client_id, redirect_uri=self.redirect_uri)
                   + CONSENT_FORM.format(fields=hidden))
        app = origin_of(self.redirect_uri)  # the form's answer redirects there
        policy = POLICY.replace("form-action 'self'", f"form-action 'self' {app}")
        return Response(HTTPStatus.OK, page("Authorize (SANDBOX, not Mailchimp)", content,
                                            SANDBOX_NOTICE),
                        headers=(("Content-Security-Policy", policy),))

    def decide(self, visit: Visit) -> Response:
        """The user's answer: back to the app with a code, or with error=access_denied."""
        fields = dict(visit.form or {})
        decision = fields.pop("decision", "")
        self.check_authorization(fields)
        if decision == "allow":
            answer = {"code": self.issue_code(fields["redirect_uri"])}
        else:
            answer = {"error": "access_denied",
                      "error_description": "The user clicked Deny."}
        if fields.get("state"):
            answer["state"] = fields["state"]
        return redirect(f"{self.redirect_uri}?{urllib.parse.urlencode(answer)}")

    def check_authorization(self, fields: Mapping[str, str]) -> None:
        """What Mailchimp checks before it asks the user anything; a mistake stops here."""
        checks = [
            (fields.get("response_type") == "code", "response_type must be code."),
            ("scope" not in fields, "Mailchimp has no scopes: leave out the scope parameter."),
            (fields.get("client_id") == self.client_id, "client_id is not a registered app."),
            (fields.get("redirect_uri") == self.redirect_uri,
             f"redirect_uri must be exactly the registered {self.redirect_uri}"),
        ]
        for passed, problem in checks:
            if not passed:
                raise FlowError(HTTPStatus.BAD_REQUEST, "", problem)

    def issue_code(self, redirect_uri: str) -> str:
        """A one-time code, valid for ten minutes, for this redirect URI only."""
        code, now = secrets.token_hex(16), self.clock()
        with self._lock:
            self._codes = {c: v for c, v in self._codes.items() if v[1] > now}
            self._codes[code] = (redirect_uri, now + LOGIN_LIFETIME)
        return code

    def token(self, visit: Visit) -> Response:
        """Token: a form with the five fields, the right client, and a fresh, unused code."""
        form = visit.form
        if form is None or set(form) != TOKEN_FIELDS:
            return oauth_error(HTTPStatus.BAD_REQUEST, "invalid_request",
                               "Send exactly grant_type, client_id, client_secret, redirect_uri "
                               "and code, as application/x-www-form-urlencoded.")
        if form["grant_type"] != "authorization_code":
            return oauth_error(HTTPStatus.BAD_REQUEST, "unsupported_grant_type",
                               "grant_type must be authorization_code.")
        if form["client_id"] != self.client_id or not hmac.compare_digest(
                form["client_secret"].encode(), self.client_secret.encode()):
            return oauth_error(HTTPStatus.UNAUTHORIZED, "invalid_client",
                               "Client authentication failed.")
        with self._lock:
            issued = self._codes.pop(form["code"], None)  # single-use: gone on the first try
        if issued is None or issued[1] <= self.clock():
            return oauth_error(HTTPStatus.BAD_REQUEST, "invalid_grant",
                               "The code is unknown, expired or already used.")
        if issued[0] != form["redirect_uri"]:
            return oauth_error(HTTPStatus.BAD_REQUEST, "invalid_grant",
                               "redirect_uri is not the one the code was issued for.")
        token = secrets.token_hex(16)
        with self._lock:
            self._tokens.add(token)
        return json_response(HTTPStatus.OK,
                             {"access_token": token, "expires_in": 0, "scope": None})

    def metadata(self, visit: Visit) -> Response:
        """Metadata: only for `Authorization: OAuth <token>`."""
        if not self.knows(visit.authorization, "OAuth"):
            return oauth_error(HTTPStatus.UNAUTHORIZED, "invalid_token",
                               "Send Authorization: OAuth <access token>.")
        return json_response(HTTPStatus.OK, {
            "dc": SANDBOX_PREFIX, "role": "owner", "accountname": "Sandbox Account",
            "user_id": 1, "login": {"login_id": 1, "login_name": "sandbox",
                                    "login_email": "sandbox@example.com"},
            "login_url": self.url, "api_endpoint": f"{self.url}/{SANDBOX_PREFIX}"})

    def ping(self, visit: Visit) -> Response:
        """The Marketing API's ping: `Bearer <token>` (or `OAuth <token>`)."""
        if not self.knows(visit.authorization, "Bearer", "OAuth"):
            scheme = visit.authorization.partition(" ")[0]
            return json_response(HTTPStatus.UNAUTHORIZED, {
                "type": "https://mailchimp.com/developer/marketing/docs/errors/",
                "title": "API Key Invalid", "status": HTTPStatus.UNAUTHORIZED.value,
                "detail": "The sandbox's stand-in did not issue this token: it forgets its "
                          "tokens when the app restarts. Connect again."
                if scheme in ("Bearer", "OAuth") else "Send Authorization: Bearer <token>."},
                "application/problem+json; charset=utf-8")
        return json_response(HTTPStatus.OK, {"health_status": "Everything's Chimpy!"})

    def knows(self, authorization: str, *schemes: str) -> bool:
        """Whether the header carries a token this stand-in issued, in an accepted scheme."""
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            return scheme in schemes and token in self._tokens


def json_response(status: HTTPStatus, data: dict[str, Any],
                  content_type: str = "application/json; charset=utf-8") -> Response:
    """A JSON reply, as Mailchimp's API gives them."""
    return Response(status, json.dumps(data).encode("utf-8"), content_type=content_type,
                    note=str(data.get("error", data.get("title", ""))))


def oauth_error(status: HTTPStatus, error: str, description: str) -> Response:
    """An OAuth 2 error reply (RFC 6749 §5.2)."""
    return json_response(status, {"error": error, "error_description": description})


def start_sandbox() -> Sandbox:
    """Run the stand-in on a free port of 127.0.0.1, in a thread of this process."""
    server = Server(("127.0.0.1", 0), label="sandbox: ")
    server.app = sandbox = Sandbox(server.origin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return sandbox


def sandboxed(sandbox: Sandbox, args: argparse.Namespace, store: Store | None = None,
              tls: ssl.SSLContext | None = None) -> tuple[Server, OAuthDemo]:
    """--sandbox: the app, pointed at the stand-in just as a user would point it anywhere."""
    config = config_from_env(sandbox.environ(), base_url=args.base_url, timeout=args.timeout)
    no_proxy = new_opener(urllib.request.ProxyHandler({}))  # stay on loopback
    server, app = make_server(config, host=args.host, port=args.port, opener=no_proxy,
                              store=store, notice=SANDBOX_NOTICE, tls=tls)
    sandbox.redirect_uri = app.config.redirect_uri  # as registering the app with Mailchimp
    app.hints[STEP_PING, HTTPStatus.UNAUTHORIZED] = SANDBOX_RESTARTED  # not "the user removed"
    return server, app


def run_sandbox(args: argparse.Namespace, store: Store,
                tls: ssl.SSLContext | None) -> tuple[Server, OAuthDemo]:
    """--sandbox: start the stand-in, then the app pointed at it."""
    return sandboxed(start_sandbox(), args, store, tls)


SANDBOX = run_sandbox
# End of the sandbox =========================================================


if __name__ == "__main__":
    sys.exit(main())
