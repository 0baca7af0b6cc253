#!/usr/bin/env -S python3 -I -S
"""flannel-py: the CNI plugin a container runtime executes for every pod it starts and stops.

This is only a shim: it frames the request (the command, the CNI_* variables and stdin as it
came) and hands it to flanneld-py over a unix socket (config key ``daemonSocket``, default
/run/flannel/cni.sock), which checks it (flanneld_py/cni/models.py) and does the work: the
daemon has the netlink layer loaded and owns the address store, so a pod costs it a few
milliseconds. It prints the daemon's answer and exits with its status. It reads the config only
to find the daemon (so a config that is not a JSON object is its own error 6 or 7) and for what
it must answer itself: VERSION, and, with no daemon, error 11 (try again later; 50 for STATUS)
in the config's cniVersion, after which the runtime retries.

Start-up is the whole budget here (the kubelet waits on this for every
pod), so this file is stdlib-only and imports almost nothing. Measured with
Python 3.11: ``json`` pulls in ``re`` and ``enum`` for ~7 ms and ``socket``
~2 ms more, while their C halves ``_json`` and ``_socket`` cost 0.5 ms;
``os`` costs ~1 ms that ``posix`` does not; the shebang's ``-I -S`` skips
site packages (~3 ms with Debian's python3, ~25 ms under pyenv). What is
left is ~9 ms, ~6.5 ms of it the interpreter's own start.
Installed as /opt/cni/bin/flannel-py by ``flanneld-py install-cni`` where the compiled shim
(shim.c) was not built.
"""

import sys

# posix, not os: only the environment is needed, and os costs ~1 ms of imports.
from posix import environ as _environb

try:
    import _socket as _sock
except ImportError:  # pragma: no cover - a Python without the C module
    import socket as _sock  # type: ignore[no-redef]

try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
    _HAVE_C_JSON = True
except ImportError:  # a Python without the C accelerator: json below, ~8 ms slower
    _HAVE_C_JSON = False

# mypy reads this block; at run time it is skipped, as typing costs milliseconds to import.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/run/flannel/cni.sock"
ANSWER_TIMEOUT = 120.0  # seconds; the kubelet gives up on its own schedule anyway

# SPEC.md error codes (and one of ours).
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
BAD_ANSWER = 110

_JSON_WHITESPACE = " \t\n\r"


class CniFailure(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# --- JSON without the json package -----------------------------------------


class _ScanContext:
    """The attributes _json's scanner reads from a json.JSONDecoder: plain JSON, nothing more."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> "NoReturn":
        raise ValueError(name + " is not valid JSON")


def loads(text: str) -> object:
    """``json.loads`` for a str; raises ValueError."""
    if not _HAVE_C_JSON:
        import json
        return json.loads(text, parse_constant=_ScanContext.parse_constant)
    start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
    try:
        # _json reads only these attributes of its context (typeshed asks for a make_scanner).
        value, end = _make_scanner(_ScanContext)(text, start)  # type: ignore[arg-type]
        if not text[end:].strip(_JSON_WHITESPACE):
            return value
    except (StopIteration, ValueError, SystemError):
        # _json reports most errors through json.decoder, and only once that is
        # imported (a SystemError before). Bad input is rare: let json explain it.
        pass
    import json
    return json.loads(text, parse_constant=_ScanContext.parse_constant)


def _unencodable(obj: object) -> "NoReturn":
    raise TypeError(f"cannot encode {obj!r} as JSON")


def dumps(obj: object) -> str:
    """Compact ``json.dumps``."""
    if not _HAVE_C_JSON:
        import json
        return json.dumps(obj, separators=(",", ":"))
    encode = _make_encoder(None, _unencodable, _quote, None, ":", ",", False, False, False)
    return "".join(encode(obj, 0))


# --- the plugin ----------------------------------------------------------------


def answer_version(config: dict[str, object]) -> str:
    version = config.get("cniVersion")
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def read_config(stdin_bytes: bytes) -> dict[str, object]:
    """The network config, read only as far as finding the daemon needs."""
    try:
        config = loads(stdin_bytes.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise CniFailure(DECODE_FAILURE, "cannot decode the network config on stdin", str(exc)) from None
    if not isinstance(config, dict):
        raise CniFailure(INVALID_CONFIG, "the network config on stdin must be a JSON object")
    return config


def ask_daemon(path: str, request: bytes) -> tuple[int, object]:
    """Send one request, return the exit status and output of the daemon's answer."""
    sock = _sock.socket(_sock.AF_UNIX, _sock.SOCK_STREAM)
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            raise CniFailure(TRY_AGAIN_LATER,
                             f"flanneld-py is not running on this node (no answer on {path}); "
                             "the runtime will retry", str(exc)) from None
        try:
            sock.sendall(request)
            sock.shutdown(_sock.SHUT_WR)
            chunks: list[bytes] = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise CniFailure(TRY_AGAIN_LATER, f"flanneld-py did not answer on {path} within {ANSWER_TIMEOUT:.0f} s; "
                             "the runtime will retry") from None
        except OSError as exc:
            raise CniFailure(TRY_AGAIN_LATER, f"lost the connection to flanneld-py on {path}",
                             str(exc)) from None
    finally:
        sock.close()
    try:
        answer = loads(b"".join(chunks).decode("utf-8"))
        if not isinstance(answer, dict) or answer.get("exit") not in (0, 1):
            raise ValueError(f"no exit status in {answer!r}")
    except ValueError as exc:
        raise CniFailure(BAD_ANSWER, "flanneld-py sent an answer the plugin cannot read; "
                         "are the plugin and the daemon the same version?", str(exc)) from None
    return answer["exit"], answer.get("output")


def run(environ: dict[str, str], stdin_bytes: bytes) -> tuple[int, object]:
    """The exit status and the object to print (None: print nothing)."""
    command = environ.get("CNI_COMMAND", "")
    config: dict[str, object] = {}
    try:
        config = read_config(stdin_bytes)
    except CniFailure as failure:
        if command != "VERSION":  # VERSION answers whatever came in, in our latest version
            return 1, _error(config, failure)
    if command == "VERSION":
        return 0, {"cniVersion": answer_version(config), "supportedVersions": list(SUPPORTED_VERSIONS)}
    # Everything else is the daemon's to check: the command, the variables, the config.
    cni_env = {name: value for name, value in environ.items() if name.startswith("CNI_")}
    request = dumps({"command": command, "env": cni_env, "config_text": stdin_bytes.decode("utf-8")}).encode("ascii")
    path = config.get("daemonSocket")
    try:
        return ask_daemon(path if isinstance(path, str) and path else DEFAULT_SOCKET, request)
    except CniFailure as failure:
        if command == "STATUS" and failure.code == TRY_AGAIN_LATER:
            failure.code = NOT_AVAILABLE  # STATUS's own word for it
        return 1, _error(config, failure)


def _error(config: dict[str, object], failure: CniFailure) -> dict[str, object]:
    error: dict[str, object] = {"cniVersion": answer_version(config), "code": failure.code, "msg": failure.msg}
    if failure.details:
        error["details"] = failure.details
    return error


def _cni_environment() -> dict[str, str]:
    """The environment as str (posix gives bytes), non-UTF-8 bytes kept as surrogates."""
    return {key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
            for key, value in _environb.items() if key.startswith(b"CNI_")}


def main() -> int:
    status, output = run(_cni_environment(), sys.stdin.buffer.read())
    if output is not None:
        sys.stdout.write(dumps(output) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
