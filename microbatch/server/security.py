"""Who may use the server, and which names a request may give for files.

Authentication, as the AUTOMATIC1111 web UI's `--api-auth` (HTTP basic: `USER:PASS[,USER:PASS]`) plus an API key
(`Authorization: Bearer KEY` or an `X-API-Key: KEY` header). When any is configured, `Authenticate` (ASGI
middleware) answers every route without valid credentials, the web page and /docs included, with HTTP 401 and a
`WWW-Authenticate` challenge, before the request is routed or its body read. Credentials are compared in constant
time: both sides are hashed to equal-length digests, compared with `hmac.compare_digest`, and every configured pair
(every key) is compared, with no early exit, so neither the answer's time nor its content tells which part was
wrong or which user exists.

Names: a request names files only by name, looked up in the server's own folders (the loaded model and VAE, LoRAs
in `models/Lora`); `path_problem` refuses any name with a path in it (a separator, `..`, a drive letter, NUL) in
the fields that name files: `<lora:NAME:W>` and other extra-network tags in the prompts, and the options
`sd_model_checkpoint`, `sd_vae`... in `override_settings` and POST /sdapi/v1/options.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from microbatch.request import UsageError

if TYPE_CHECKING:  # the serve extra; imported where used, so that scripts/serve.py can parse its flags without it
    from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

REALM = "microbatch-diffusion"


@dataclass(frozen=True)
class SecurityOptions:
    """Who may call the server and from which web origins.

    users: (user, password) pairs for HTTP basic authentication (`--api-auth`); api_keys: accepted keys
    (`--api-key`); no users and no keys: no authentication. cors_origins: origins a browser may call the API from
    (`--cors-allow-origins`); empty: CORS off (browsers allow only the server's own pages)."""

    users: tuple[tuple[str, str], ...] = ()
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @property
    def auth_required(self) -> bool:
        return bool(self.users or self.api_keys)


def parse_api_auth(value: str) -> tuple[tuple[str, str], ...]:
    """`--api-auth USER:PASS[,USER:PASS]` (the web UI's format) -> ((user, password), ...). A password may hold
    colons (the user ends at the first); an empty user or password, or a pair without a colon, is a UsageError."""
    pairs = []
    for item in value.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise UsageError(f"--api-auth takes USER:PASS[,USER:PASS], each with a user and a password; got {item!r}")
        pairs.append((user, password))
    return tuple(pairs)


def _digest(value: bytes) -> bytes:
    # Equal-length inputs for compare_digest: its time then depends on neither the length nor the content.
    return hashlib.sha256(value).digest()


class Credentials:
    """The configured users and keys, kept as digests; `check_basic` and `check_key` compare against all."""

    def __init__(self, users: Iterable[tuple[str, str]] = (), api_keys: Iterable[str] = ()) -> None:
        self.users = [(_digest(u.encode()), _digest(p.encode())) for u, p in users]
        self.keys = [_digest(k.encode()) for k in api_keys]

    def check_basic(self, user: bytes, password: bytes) -> bool:
        u, p = _digest(user), _digest(password)
        ok = False
        for known_user, known_password in self.users:  # every pair, no early exit; `&` and `|` do not short-circuit
            ok |= hmac.compare_digest(u, known_user) & hmac.compare_digest(p, known_password)
        return ok

    def check_key(self, key: bytes) -> bool:
        k = _digest(key)
        ok = False
        for known in self.keys:
            ok |= hmac.compare_digest(k, known)
        return ok


class Authenticate:
    """ASGI middleware: every HTTP request needs `Authorization: Basic ...` with a configured user and password,
    or `Authorization: Bearer KEY` / `X-API-Key: KEY` with a configured key; else HTTP 401 with a challenge
    (`WWW-Authenticate: Basic`, so that a browser asks for the user and password, as the web UI's API answers;
    `Bearer` when only keys are configured)."""

    def __init__(self, app: ASGIApp, users: Iterable[tuple[str, str]] = (), api_keys: Iterable[str] = ()) -> None:
        self.app = app
        self.credentials = Credentials(users, api_keys)
        challenges = []
        if self.credentials.users:
            challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')
        if self.credentials.keys:
            challenges.append(f'Bearer realm="{REALM}"')
        self.challenges = challenges

    def allowed(self, headers: Mapping[bytes, bytes]) -> Optional[bool]:
        """True: valid credentials; False: credentials that are not valid; None: none sent."""
        key = headers.get(b"x-api-key")
        authorization = headers.get(b"authorization")
        if key is None and authorization is None:
            return None
        ok = False
        if key is not None:
            ok |= self.credentials.check_key(key.strip())
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(b" ")
            scheme, value = scheme.lower(), value.strip()
            if scheme == b"bearer":
                ok |= self.credentials.check_key(value)
            elif scheme == b"basic":
                try:
                    decoded = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    decoded = b""
                user, sep, password = decoded.partition(b":")
                ok |= bool(sep) & self.credentials.check_basic(user, password)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.lower(), value)  # the first of repeated headers
        verdict = self.allowed(headers)
        if verdict:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        logger.info("refused %s %s from %s: %s", scope.get("method", "WS"), scope.get("path"), client, "bad credentials" if verdict is False else "no credentials")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        detail = "Not authenticated" if verdict is None else "Incorrect username or password"
        response = JSONResponse({"error": "Unauthorized", "detail": detail}, status_code=401)
        for challenge in self.challenges:
            response.raw_headers.append((b"www-authenticate", challenge.encode()))
        await response(scope, receive, send)


# -- names of files --------------------------------------------------------------------------------------------------

# Options (override_settings, POST /options) whose values name files in the web UI.
FILE_OPTIONS = ("sd_model_checkpoint", "sd_vae", "sd_unet", "sd_lora", "sd_hypernetwork", "refiner_checkpoint")
# Request fields whose values name files (hires fix and refiner, in the web UI's payload).
FILE_FIELDS = ("hr_checkpoint_name", "refiner_checkpoint")
# Request fields with prompt text, whose <lora:NAME:...> tags name files.
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")

_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # as microbatch.lora reads them
_DRIVE = re.compile(r"^[A-Za-z]:")


def name_problem(field: str, value: Any) -> Optional[str]:
    """A one-line reason when `value` (a string naming a file) holds a path, else None."""
    if not isinstance(value, str):
        return None
    if "/" in value or "\\" in value or ".." in value or "\x00" in value or _DRIVE.match(value.strip()):
        return (
            f"{field} {value!r} is not a plain name: this server looks names up in its own folders and refuses paths "
            f"('/', '\\', '..', drive letters)"
        )
    return None


def prompt_problem(field: str, prompt: Any) -> Optional[str]:
    """A one-line reason when an extra-network tag (`<lora:NAME:W>`...) in `prompt` holds a path, else None."""
    if not isinstance(prompt, str):
        return None
    for m in _EXTRA_NETWORK_TAG.finditer(prompt):
        body = m.group(2)
        if "/" in body or "\\" in body or ".." in body or "\x00" in body:
            return (
                f"{field}: the tag {m.group(0)!r} names a path; LoRAs are looked up by name in this server's folder "
                f"(no '/', '\\' or '..')"
            )
    return None


def options_problem(options: Mapping[str, Any], where: str = "") -> Optional[str]:
    """The first file-naming option in `options` whose value holds a path, as a one-line reason, else None."""
    for key in FILE_OPTIONS:
        reason = name_problem(f"{where}{key}", options.get(key))
        if reason:
            return reason
    return None


def path_problem(payload: Any) -> Optional[str]:
    """The first field of a txt2img / img2img payload that names a file with a path in it, as a one-line reason,
    else None: prompts' extra-network tags, file-name fields, and `override_settings`."""
    for field in PROMPT_FIELDS:
        reason = prompt_problem(field, getattr(payload, field, None))
        if reason:
            return reason
    for field in FILE_FIELDS:
        reason = name_problem(field, getattr(payload, field, None))
        if reason:
            return reason
    overrides = getattr(payload, "override_settings", None)
    if isinstance(overrides, Mapping):
        return options_problem(overrides, "override_settings.")
    return None
