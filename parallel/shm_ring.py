"""A one-writer, many-reader message ring in shared memory, for ranks on one host.

Each decode step, tensor-parallel rank 0 hands the batch to the other ranks.
Over gloo that cost rank 0 0.25-0.4 ms a step (2 x H200), and a rank that
waits in a blocking socket read wakes up late, so that rank 0's first
all-reduce waits for it. Here the message is copied into a shared mapping and
the readers poll for it.

Layout: 64-byte lines of little-endian uint64. Line 0: magic, number of readers,
slots, slot size, the writer's pid. Line 1 + r: reader r's pid and how many
chunks it has consumed. Then the slots, each a line [sequence number, length,
CRC32, last-chunk flag] and `slot_bytes` of payload. A message longer than a
slot goes as chunks in consecutive slots.

The writer reuses a slot only once every reader has consumed the chunk that
was there, writes payload, length and checksum, and publishes the sequence
number last. A reader waits for the sequence number it expects, copies the
chunk out and checks the CRC: where the stores became visible out of order (on
weakly ordered CPUs) the check fails and it reads again. A wait that finds the
other side's process gone raises `ShmRingClosed`.

The file lives in /dev/shm (or the temp folder) under a random name; the
writer unlinks it once the readers have opened it, so nothing is left behind
whichever process dies.
"""
from __future__ import annotations

import mmap
import os
import secrets
import tempfile
import time
import zlib

import numpy as np

from .spin import spin_until

MAGIC = 0x74707368_6D72696E  # "tpshmrin"
LINE = 64
WORDS = LINE // 8
_LIVENESS_CHECK_S = 1.0


class ShmRingClosed(ConnectionError):
    """The process at the other end of the ring is gone."""


def _folder() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmRing:
    """`ShmRing.create(readers)` in the writer, `ShmRing.attach(path, r)` in reader r.

    spin_s: how long a wait polls without sleeping (spin.py) before it backs off
    to sleeps of up to 1 ms. GPU ranks spin through a decode step; CPU ranks,
    which need their cores, back off at once.
    """

    def __init__(self, path: str, reader: int | None, spin_s: float) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path
        self.reader = reader
        self.spin_s = spin_s
        words = np.frombuffer(self._map, dtype=np.uint64)
        self._words = words
        magic, readers, slots, slot_bytes, _ = (int(v) for v in words[:5])
        if magic != MAGIC:
            raise ValueError(f"{path} is not a tpserve message ring")
        self.num_readers, self.slots, self.slot_bytes = readers, slots, slot_bytes
        first = LINE * (1 + readers)
        self._slot_base = first
        self._stride = LINE + slot_bytes
        self._seq = 0  # chunks written (writer) or consumed (reader)
        if reader is not None:
            self._reader_line(reader)[0] = os.getpid()

    @classmethod
    def create(cls, readers: int, slots: int = 8, slot_bytes: int = 1 << 20,
               spin_s: float = 0.0) -> "ShmRing":
        path = os.path.join(_folder(), f"tpserve-ring-{secrets.token_hex(8)}")
        size = LINE * (1 + readers) + slots * (LINE + slot_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            header = np.array([MAGIC, readers, slots, slot_bytes, os.getpid()], dtype=np.uint64)
            os.pwrite(fd, header.tobytes(), 0)
        finally:
            os.close(fd)
        return cls(path, None, spin_s)

    @classmethod
    def attach(cls, path: str, reader: int, spin_s: float = 0.0) -> "ShmRing":
        return cls(path, reader, spin_s)

    def unlink(self) -> None:
        """Removes the file name (the mapping stays); call once every reader attached."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._words = None
        self._map.close()

    # -- layout --------------------------------------------------------------

    def _reader_line(self, r: int) -> np.ndarray:
        start = (LINE * (1 + r)) // 8
        return self._words[start:start + WORDS]

    def _slot(self, seq: int) -> tuple[np.ndarray, int]:
        """(the slot's head words, byte offset of its payload) for chunk number seq."""
        offset = self._slot_base + ((seq - 1) % self.slots) * self._stride
        return self._words[offset // 8:offset // 8 + WORDS], offset + LINE

    # -- writer --------------------------------------------------------------

    def write(self, data: bytes | memoryview, timeout_s: float | None = None) -> None:
        view = memoryview(data).cast("B")
        chunks = max(1, -(-len(view) // self.slot_bytes))
        for i in range(chunks):
            part = view[i * self.slot_bytes:(i + 1) * self.slot_bytes]
            seq = self._seq + 1
            self._wait(lambda: self._oldest_read() >= seq - self.slots, timeout_s,
                       self._reader_pids, "a reader to free a slot")
            head, payload = self._slot(seq)
            self._map[payload:payload + len(part)] = part
            head[1] = len(part)
            head[2] = zlib.crc32(part)
            head[3] = int(i == chunks - 1)
            head[0] = seq  # published last
            self._seq = seq

    def _oldest_read(self) -> int:
        return min(int(self._reader_line(r)[1]) for r in range(self.num_readers))

    def _reader_pids(self) -> list[int]:
        return [int(self._reader_line(r)[0]) for r in range(self.num_readers)]

    # -- reader --------------------------------------------------------------

    def read(self, timeout_s: float | None = None) -> bytes:
        parts = []
        while True:
            seq = self._seq + 1
            head, payload = self._slot(seq)
            while True:
                self._wait(lambda: int(head[0]) == seq, timeout_s, self._writer_pid,
                           "the next message")
                n, crc, last = int(head[1]), int(head[2]), int(head[3])
                part = bytes(self._map[payload:payload + n])
                if zlib.crc32(part) == crc and int(head[0]) == seq:
                    break
            parts.append(part)
            self._seq = seq
            self._reader_line(self.reader)[1] = seq
            if last:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _writer_pid(self) -> list[int]:
        return [int(self._words[4])]

    # -- waiting -------------------------------------------------------------

    def _wait(self, ready, timeout_s, peers, what: str) -> None:
        if spin_until(ready, self.spin_s):
            return
        start = last_check = time.monotonic()
        pause = 0.0
        while not ready():
            now = time.monotonic()
            pause = min(1e-3, max(2e-5, pause * 2))
            time.sleep(pause)
            if now - last_check > _LIVENESS_CHECK_S:
                last_check = now
                gone = [pid for pid in peers() if pid and not _alive(pid)]
                if gone:
                    raise ShmRingClosed(f"process {gone[0]} left the message ring while this "
                                        f"one waited for {what}")
                if timeout_s is not None and now - start > timeout_s:
                    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
