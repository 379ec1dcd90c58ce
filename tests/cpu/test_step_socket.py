"""The engine-to-rank-0 step link: answers and errors come back, a slow answer runs the
health callback, polling (spin_s) gives the same results as blocking, and a wrong
token is refused."""
import threading
import time
from collections import deque

import pytest

from tpserve.parallel.spin import _spin_s_from_env, spin_until
from tpserve.parallel.step_socket import StepClient, StepServer


def _serve(server, handlers, deferred=frozenset()):
    done = {}
    thread = threading.Thread(
        target=lambda: done.setdefault("steps", server.serve(handlers, 10, deferred)))
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


class Work:
    """Stands in for a step queued on a device: done once `release()` is called."""

    def __init__(self, log, value):
        self.log, self.value, self.released = log, value, threading.Event()
        log.append(("launch", value))

    def done(self):
        return self.released.is_set()

    def result(self):
        self.released.wait(10)
        if isinstance(self.value, Exception):
            raise self.value
        self.log.append(("answer", self.value))
        return self.value


def test_deferred_steps_answer_in_order():
    """Step t+1 sent before step t's answer is read: it starts while step t runs, and
    answers (failures included) come back in request order."""
    log, works = [], []

    def launch(value):
        works.append(Work(log, value))
        return works[-1]

    server = StepServer("127.0.0.1", spin_s=0.05, launch_first=True)
    thread, done = _serve(server, {"step": launch, "add": lambda a, b: a + b},
                          deferred=frozenset({"step"}))
    client = StepClient("127.0.0.1", server.port, server.token, 10, spin_s=0.05)
    client.send("step", (1,))
    client.send("step", (2,))
    while len(works) < 2:  # step 2 starts though step 1 is not done
        time.sleep(0.001)
    works[1].released.set()
    works[0].released.set()
    assert client.wait(lambda waited: None) == 1
    assert client.wait(lambda waited: None) == 2
    assert log == [("launch", 1), ("launch", 2), ("answer", 1), ("answer", 2)]
    client.send("step", (ValueError("bad batch"),))  # a failed step, then a plain call
    client.send("add", (2, 3))  # answered after the step before it
    works[-1].released.set()
    with pytest.raises(ValueError, match="bad batch"):
        client.wait(lambda waited: None)
    assert client.wait(lambda waited: None) == 5
    assert client.call("stop", (), lambda waited: None) == 4
    thread.join(10)
    assert done["steps"] == 4
    client.close()


class Done:
    def __init__(self, done):
        self._done = done

    def done(self):
        return self._done


@pytest.mark.parametrize("launch_first", [True, False])
def test_what_rank_0_does_next(launch_first):
    """A request is read first when nothing is pending or the pending step is still
    running; when both are ready, GPU ranks (launch_first) start the request first (the
    device keeps busy), CPU ranks answer first (their steps compute when started)."""
    server = StepServer("127.0.0.1", spin_s=0.0, launch_first=launch_first)
    first = server._request_first
    assert first(lambda: False, deque()) is True
    assert first(lambda: True, deque([Done(False)])) is True
    assert first(lambda: False, deque([Done(True)])) is False
    assert first(lambda: True, deque([Done(True)])) is launch_first
    server._listener.close()


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
