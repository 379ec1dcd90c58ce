"""ShmRing: messages arrive whole and in order for every reader, through slot reuse,
chunking and a slow reader; a wait notices a vanished peer; no file is left behind."""
import multiprocessing as mp
import os
import threading
import time

import pytest

from tpserve.parallel.shm_ring import ShmRing, ShmRingClosed


def _messages(n):
    # sizes around the 64-byte slot: empty, one chunk, exactly one slot, several chunks
    sizes = [0, 1, 63, 64, 65, 200, 7]
    return [bytes((i * 31 + j) % 251 for j in range(sizes[i % len(sizes)])) for i in range(n)]


def test_every_reader_gets_every_message_in_order():
    writer = ShmRing.create(readers=2, slots=3, slot_bytes=64)
    readers = [ShmRing.attach(writer.path, r) for r in range(2)]
    writer.unlink()
    assert not os.path.exists(writer.path)  # the open mappings keep working
    sent = _messages(40)
    got = [[], []]

    def read(r, delay):
        for _ in sent:
            got[r].append(readers[r].read(timeout_s=30))
            time.sleep(delay)  # reader 1 lags: the writer must wait for its slots

    threads = [threading.Thread(target=read, args=(r, d)) for r, d in ((0, 0), (1, 0.002))]
    for t in threads:
        t.start()
    for m in sent:
        writer.write(m, timeout_s=30)
    for t in threads:
        t.join(60)
    assert got[0] == sent and got[1] == sent


def test_attach_rejects_a_file_that_is_not_a_ring(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a tpserve message ring"):
        ShmRing.attach(str(path), 0)


def _writer_that_leaves(conn):
    ring = ShmRing.create(readers=1, slots=2, slot_bytes=64)
    conn.send(ring.path)
    conn.recv()  # the reader attached
    os._exit(0)  # gone without a word


def test_reader_notices_the_writer_is_gone():
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_writer_that_leaves, args=(theirs,))
    proc.start()
    assert ours.poll(60)
    path = ours.recv()
    reader = ShmRing.attach(path, 0)
    os.unlink(path)
    ours.send("attached")
    proc.join(30)
    start = time.monotonic()
    with pytest.raises(ShmRingClosed, match=f"process {proc.pid} left"):
        reader.read()
    assert time.monotonic() - start < 5


def test_writer_times_out_on_a_reader_that_never_reads():
    writer = ShmRing.create(readers=1, slots=2, slot_bytes=64)
    ShmRing.attach(writer.path, 0)  # alive (this process) but never reading
    writer.unlink()
    writer.write(b"a")
    writer.write(b"b")
    with pytest.raises(TimeoutError, match="a reader to free a slot"):
        writer.write(b"c", timeout_s=0.5)
