"""The per-step link between the engine and tensor-parallel rank 0: one TCP socket.

A Ray actor call costs milliseconds a step (submission, scheduling, result
transfer), which at batch 1 was as long as the forward itself. Rank 0 instead
listens on a port the OS picks on its node, and the engine connects once; each
step is then one length-prefixed pickle each way. The engine authenticates with a
random token it got through Ray (only Ray's own, trusted channel knows it), and
rank 0 accepts exactly one connection.

Messages are ``(method, args)`` to rank 0 and ``(ok, result or exception)`` back.
"""
from __future__ import annotations

import pickle
import secrets
import select
import socket
import struct
from typing import Any, Callable

from .spin import spin_until

_LEN = struct.Struct("!Q")


class StepSocketClosed(ConnectionError):
    """The other side closed the connection (its process ended)."""


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise StepSocketClosed("the connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, size))


def _no_delay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _readable(sock: socket.socket) -> Callable[[], bool]:
    return lambda: bool(select.select([sock], [], [], 0)[0])


class StepServer:
    """Rank 0's side: `listen()` then `serve(handlers)` until the engine says stop.
    spin_s: how long to poll for the next request before blocking (spin.py)."""

    def __init__(self, host: str, spin_s: float = 0.0) -> None:
        self.spin_s = spin_s
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]

    def serve(self, handlers: dict[str, Callable[..., Any]], accept_timeout_s: float) -> int:
        """Runs requests until "stop" (or the engine goes away); returns the step count."""
        self._listener.settimeout(accept_timeout_s)
        try:
            conn, _ = self._listener.accept()
        finally:
            self._listener.close()
        conn.settimeout(None)
        _no_delay(conn)
        steps = 0
        with conn:
            if _recv(conn) != self.token:
                raise PermissionError("a step connection presented the wrong token")
            _send(conn, (True, None))
            readable = _readable(conn)
            while True:
                spin_until(readable, self.spin_s)
                try:
                    method, args = _recv(conn)
                except StepSocketClosed:
                    return steps
                if method == "stop":
                    _send(conn, (True, steps))
                    return steps
                try:
                    result = (True, handlers[method](*args))
                except Exception as exc:  # noqa: BLE001 - re-raised on the engine's side
                    result = (False, exc)
                _send(conn, result)
                steps += 1


class StepClient:
    """The engine's side. `call` polls for the answer for `spin_s` (spin.py), then
    waits in slices of `poll_s`, running `between(elapsed)` after each, so that a
    dead peer rank (which leaves rank 0 hanging) is noticed."""

    def __init__(self, host: str, port: int, token: str, timeout_s: float,
                 spin_s: float = 0.0) -> None:
        self.spin_s = spin_s
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.settimeout(None)
        _no_delay(self._sock)
        _send(self._sock, token)
        _recv(self._sock)  # the acknowledgement; a wrong token closes the connection instead

    def call(self, method: str, args: tuple, between: Callable[[float], None],
             poll_s: float = 1.0) -> Any:
        self.send(method, args)
        return self.wait(between, poll_s)

    def send(self, method: str, args: tuple) -> None:
        """The first half of `call`: the request is on its way when this returns."""
        _send(self._sock, (method, args))

    def wait(self, between: Callable[[float], None], poll_s: float = 1.0) -> Any:
        """The second half of `call`: rank 0's answer (or its exception, raised)."""
        waited = 0.0
        if not spin_until(_readable(self._sock), self.spin_s):
            while not select.select([self._sock], [], [], poll_s)[0]:
                waited += poll_s
                between(waited)
        ok, value = _recv(self._sock)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._sock.close()
