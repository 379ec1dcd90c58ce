"""The per-step link between the engine and tensor-parallel rank 0: one TCP socket.

A Ray actor call costs milliseconds a step (submission, scheduling, result
transfer), which at batch 1 was as long as the forward itself. Rank 0 instead
listens on a port the OS picks on its node, and the engine connects once; each
step is then one length-prefixed pickle each way. The engine authenticates with a
random token it got through Ray (only Ray's own, trusted channel knows it), and
rank 0 accepts exactly one connection.

Messages are ``(method, args)`` to rank 0 and ``(ok, result or exception)`` back,
one answer per request and in request order; the engine may send a step before
reading the answer to the one before (StepServer says how rank 0 orders them).
"""
from __future__ import annotations

import pickle
import secrets
import select
import socket
import struct
from collections import deque
from typing import Any, Callable, Protocol

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


class Deferred(Protocol):
    """What a deferred handler returns: work under way on a device."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...


class _Failed:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        raise self.exc


class StepServer:
    """Rank 0's side: `listen()` then `serve(handlers)` until the engine says stop.
    spin_s: how long to poll for the next request before blocking (spin.py).

    Deferred methods (steps) return work under way (`Deferred`); their answers go
    back in order once done. The engine may send step t+1 before reading step t's
    answer (async scheduling); with launch_first (GPU ranks) a request that is
    already waiting is started before the answer of the step before it is sent,
    so the device goes from one step to the next without waiting for the host."""

    def __init__(self, host: str, spin_s: float = 0.0, launch_first: bool = False) -> None:
        self.spin_s = spin_s
        self.launch_first = launch_first
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]

    def serve(self, handlers: dict[str, Callable[..., Any]], accept_timeout_s: float,
              deferred: frozenset[str] = frozenset()) -> int:
        """Runs requests until "stop" (or the engine goes away); returns the step count."""
        self._listener.settimeout(accept_timeout_s)
        try:
            conn, _ = self._listener.accept()
        finally:
            self._listener.close()
        conn.settimeout(None)
        _no_delay(conn)
        steps = 0
        pending: deque[Deferred] = deque()
        with conn:
            if _recv(conn) != self.token:
                raise PermissionError("a step connection presented the wrong token")
            _send(conn, (True, None))
            readable = _readable(conn)
            while True:
                if not self._request_first(readable, pending):
                    _answer(conn, pending.popleft())
                    continue
                try:
                    method, args = _recv(conn)
                except StepSocketClosed:
                    return steps
                if method in deferred:
                    try:
                        pending.append(handlers[method](*args))
                    except Exception as exc:  # noqa: BLE001 - re-raised on the engine's side
                        pending.append(_Failed(exc))
                    steps += 1
                    continue
                while pending:
                    _answer(conn, pending.popleft())
                if method == "stop":
                    _send(conn, (True, steps))
                    return steps
                try:
                    result = (True, handlers[method](*args))
                except Exception as exc:  # noqa: BLE001 - re-raised on the engine's side
                    result = (False, exc)
                _send(conn, result)
                steps += 1

    def _request_first(self, readable: Callable[[], bool], pending: deque) -> bool:
        """Whether to read the next request now (True) or answer pending[0] (False)."""
        if not pending:
            spin_until(readable, self.spin_s)
            return True  # blocks in the read if nothing came
        head = pending[0]
        spin_until(lambda: readable() or head.done(), self.spin_s)
        return readable() and (self.launch_first or not head.done())


def _answer(conn: socket.socket, work: Deferred) -> None:
    try:
        result = (True, work.result())
    except Exception as exc:  # noqa: BLE001 - re-raised on the engine's side
        result = (False, exc)
    _send(conn, result)


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
