"""An HTTP-aware loopback proxy in front of the test S3 server that injects faults by rule.

Each request is read whole (head and body), matched against the rules in order and either
forwarded upstream unchanged or answered with a fault: a 5xx with an S3 XML error body, a
connection reset before the request was read or midway through the response body, a delay
before the response, a body cut short after promising its full ``Content-Length``, or a
short body whose ``Content-Length`` says so (a store that returns less than asked). The
client signs requests for the proxy's address; the ``Host`` header is forwarded as sent, so
signatures still match upstream.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from s3server import LoopbackProxy

Kind = Literal["status", "reset-request", "reset-response", "delay", "truncate", "short"]
S3_ERRORS = {  # status -> (S3 error code, message), as S3 words them
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Rule:
    """Inject ``kind`` into requests whose method matches ``method`` and whose path with
    query matches ``path`` (regular expressions; the method must match whole, the path is
    searched): the matching requests numbered ``skip`` to ``skip + times - 1`` (counted from
    0) get the fault.

    ``status`` is the HTTP code of a ``status`` fault (500 InternalError or 503 SlowDown);
    ``seconds`` the wait of a ``delay``. ``seen`` and ``fired`` count the matching requests
    and the faults injected."""

    kind: Kind
    path: str = ""
    method: str = ".*"
    skip: int = 0
    times: int = 1
    status: int = 503
    seconds: float = 0.0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        if not re.fullmatch(self.method, method) or not re.search(self.path, target):
            return False
        self.seen += 1
        if self.skip < self.seen <= self.skip + self.times:
            self.fired += 1
            return True
        return False


@dataclass
class FaultProxy(LoopbackProxy):
    """The proxy: ``start()``, set ``rules``, point s3fs at ``url``; ``log`` lists every
    request as (method, target, fault kind or None)."""

    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)

    def reset(self, *rules: Rule) -> None:
        """Replace the rules (none: a plain proxy) and clear the log."""
        with self._lock:
            self.rules, self.log = list(rules), []

    def faults(self) -> list[tuple[str, str, str]]:
        """The requests that got a fault."""
        with self._lock:
            return [entry for entry in self.log if entry[2]]  # type: ignore[misc]

    def _connected(self, client: socket.socket) -> None:
        with self._lock:
            self._open.add(client)
        threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _rule_for(self, method: str, target: str) -> Rule | None:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, target)), None)
            self.log.append((method, target, rule.kind if rule else None))
            return rule

    def _serve(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = client.makefile("rb")
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            while head := _read_head(reader):
                method, target, headers = head
                rule = self._rule_for(method, target)
                if rule is not None and rule.kind == "reset-request":
                    _reset(client)  # the body, if any, is still on its way
                    return
                if headers.pop("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "transfer-encoding" in headers:
                    raise NotImplementedError("chunked request bodies are not proxied")
                body = reader.read(int(headers.get("content-length", 0)))
                if rule is not None and rule.kind == "status":
                    client.sendall(_s3_error(rule.status, target))
                    continue
                upstream.request(method, target, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                if rule is not None and rule.kind == "delay":
                    time.sleep(rule.seconds)
                if rule is not None and rule.kind == "short":
                    data = data[: len(data) // 2]
                out = _response_head(resp, None if method == "HEAD" else len(data))
                if rule is not None and rule.kind in ("reset-response", "truncate"):
                    client.sendall(out + data[: len(data) // 2])
                    if rule.kind == "reset-response":
                        _reset(client)
                    return  # a truncated body ends with an orderly close
                client.sendall(out + data)
        except OSError:
            pass
        finally:
            upstream.close()
            with self._lock:
                self._open.discard(client)
            with contextlib.suppress(OSError):
                client.close()


def _read_head(reader) -> tuple[str, str, dict[str, str]] | None:
    """Request line and headers (names lower-cased), or None at the end of the connection."""
    line = reader.readline()
    if not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (raw := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _response_head(resp: http.client.HTTPResponse, length: int | None) -> bytes:
    """The upstream response's status and headers, its body now ``length`` bytes long
    (None: a HEAD response, whose Content-Length describes the object and stays)."""
    drop = HOP_BY_HOP - ({"content-length"} if length is None else set())
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
    lines += [f"{k}: {v}" for k, v in resp.getheaders() if k.lower() not in drop]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _s3_error(status: int, target: str) -> bytes:
    code, message = S3_ERRORS[status]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{target.split('?')[0]}</Resource><RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST) rather than an orderly shutdown."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@contextlib.contextmanager
def fault_proxy_for(endpoint_url: str) -> Iterator[FaultProxy]:
    """A started proxy in front of the S3 server at ``endpoint_url``, stopped on exit."""
    url = urlparse(endpoint_url)
    proxy = FaultProxy((url.hostname, url.port)).start()
    try:
        yield proxy
    finally:
        proxy.stop()
