"""The engine-to-rank-0 step link: answers and errors come back, a slow answer runs the
health callback, polling (spin_s) gives the same results as blocking, and a wrong
token is refused."""
import threading
import time

import pytest

from tpserve.parallel.spin import _spin_s_from_env, spin_until
from tpserve.parallel.step_socket import StepClient, StepServer


def _serve(server, handlers):
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("steps", server.serve(handlers, 10)))
    thread.start()
    return thread, done


def _slow(seconds):
    time.sleep(seconds)
    return "late"


def _fail():
    raise ValueError("bad batch")


@pytest.mark.parametrize("spin_s", [0.0, 0.05])
def test_calls_answers_errors_and_slow_answers(spin_s):
    server = StepServer("127.0.0.1", spin_s=spin_s)
    handlers = {"add": lambda a, b: a + b, "fail": _fail, "slow": _slow}
    thread, done = _serve(server, handlers)
    client = StepClient("127.0.0.1", server.port, server.token, 10, spin_s=spin_s)
    waits = []
    assert [client.call("add", (i, 1), waits.append) for i in range(50)] == list(range(1, 51))
    with pytest.raises(ValueError, match="bad batch"):
        client.call("fail", (), waits.append)
    client.send("add", (2, 3))  # the two halves, as submit_step uses them
    assert client.wait(waits.append) == 5
    assert waits == []
    assert client.call("slow", (0.35,), waits.append, poll_s=0.1) == "late"
    assert len(waits) >= 2 and waits == sorted(waits)  # waited 0.1, 0.2, ...
    assert client.call("stop", (), waits.append) == 53  # every call but stop
    thread.join(10)
    assert done["steps"] == 53
    client.close()


def test_wrong_token_is_refused():
    server = StepServer("127.0.0.1")
    errors = []

    def run():
        try:
            server.serve({}, 10)
        except PermissionError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    with pytest.raises((ConnectionError, EOFError, OSError)):
        StepClient("127.0.0.1", server.port, "not-the-token", 10)
    thread.join(10)
    assert errors and "wrong token" in str(errors[0])


def test_spin_until():
    flag = threading.Event()
    threading.Timer(0.02, flag.set).start()
    start = time.monotonic()
    assert spin_until(flag.is_set, 2.0)
    assert time.monotonic() - start < 1.0
    assert not spin_until(lambda: False, 0.05)
    assert not spin_until(lambda: False, 0.0)


@pytest.mark.parametrize("raw, want", [(None, 0.05), ("0", 0.0), ("0.2", 0.2), ("abc", 0.05),
                                       ("-1", 0.05), ("nan", 0.05)])
def test_spin_time_from_the_environment(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("TPSERVE_STEP_SPIN_S", raising=False)
    else:
        monkeypatch.setenv("TPSERVE_STEP_SPIN_S", raw)
    assert _spin_s_from_env() == want
