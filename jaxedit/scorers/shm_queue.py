"""Shared-memory transport between the trainer (client) and the scorer process (server).

    with ScorerClient(["python", "-m", "jaxedit.scorers.server", "--scorer=simple"]) as scorer:
        rid = scorer.submit(inputs=..., generated=..., styles=..., masks=...)   # returns at once
        ...                                                                    # sample the next batch
        scores = scorer.result(rid)                                            # {name: float32 (B,)}

Images never travel through a pipe or a pickle. The client preallocates ``slots`` shared-memory
segments of ``slot_bytes`` each; a request's arrays are copied into a free slot and only a small
control message crosses the connection (a Unix socket, authenticated):

    client -> server   ("score", request_id, slot, layout)      layout: [(name, dtype, shape, offset)]
    server -> client   ("done",  request_id, slot, layout)      float32 results written in the slot
                       ("error", request_id, slot, message)     e.g. a malformed frame

Backpressure: ``submit`` waits while every slot is in use. Every wait has a timeout, and while
waiting the client watches the server process: if it died, the client either restarts it and
resends the requests in flight (``restart=True``; their data is still in the slots) or raises
`ScorerProcessError` with the server's last stderr lines.

Segments are created (and owned) by the client and unlinked by ``close()`` (also on exceptions
and at interpreter exit). If the client is SIGKILLed, Python's resource tracker (a separate
process) unlinks what the client created, and a server the client started exits with it.
The server only attaches, and unregisters the segments from ITS resource tracker (Python 3.11
would otherwise unlink them when the server exits, under a still-running client).

This module imports neither jax nor torch: both sides use it.
"""
from __future__ import annotations

import atexit
import collections
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import connection, resource_tracker, shared_memory
from typing import Sequence

import numpy as np

AUTHKEY_ENV = "JAXEDIT_SCORER_AUTHKEY"
ALIGN = 64
RESULT_BYTES = 1 << 16  # room kept after a request's arrays for its results (float32 scores)


class ScorerError(RuntimeError):
    """The server rejected a request (the message says why, e.g. a wrong shape or dtype)."""


class ScorerProcessError(RuntimeError):
    """The scorer process died, could not start, or closed the connection."""


class ScorerTimeout(ScorerProcessError):
    """The scorer process did not answer in time (it is still running)."""


# ---------------------------------------------------------------------------- frames in a buffer
def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes `pack` needs for these arrays (each aligned to 64 bytes)."""
    return sum(-(-np.asarray(a).nbytes // ALIGN) * ALIGN for a in arrays.values())


def pack(arrays: dict[str, np.ndarray], buf: memoryview, offset: int = 0) -> tuple[list, int]:
    """Copies arrays into ``buf`` from ``offset`` on; returns (layout, end offset)."""
    layout = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {a.dtype}: only plain numeric arrays can be sent")
        end = offset + a.nbytes
        if end > len(buf):
            raise ValueError(f"arrays need {end} bytes, the slot has {len(buf)}")
        np.frombuffer(buf, np.uint8, a.nbytes, offset)[:] = a.reshape(-1).view(np.uint8)
        layout.append((name, a.dtype.str, tuple(a.shape), offset))
        offset = -(-end // ALIGN) * ALIGN
    return layout, offset


def unpack(buf: memoryview, layout: Sequence, copy: bool = True) -> dict[str, np.ndarray]:
    """The arrays of ``layout``: copies (the slot may be reused as soon as this returns) or, with
    ``copy=False``, read-only views into ``buf`` (valid while the slot is not reused)."""
    out = {}
    for name, dtype, shape, offset in layout:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + count * dtype.itemsize > len(buf):
            raise ValueError(f"array {name!r} ({dtype}, {tuple(shape)}) at offset {offset} does not fit the slot")
        view = np.frombuffer(buf, dtype, count, offset).reshape(shape)
        out[name] = view.copy() if copy else view
    return out


# ----------------------------------------------------------------------------------- segments
class SlotPool:
    """``slots`` shared-memory segments of ``slot_bytes`` each; the creator owns (unlinks) them."""

    def __init__(self, slots: int, slot_bytes: int):
        if slots < 1 or slot_bytes < ALIGN:
            raise ValueError(f"need at least 1 slot of at least {ALIGN} bytes, got {slots} x {slot_bytes}")
        prefix = f"jaxedit-{os.getpid()}-{secrets.token_hex(4)}"
        self.segments: list[shared_memory.SharedMemory] = []
        try:
            for i in range(slots):
                self.segments.append(shared_memory.SharedMemory(f"{prefix}-{i}", create=True, size=slot_bytes))
        except BaseException:
            self.unlink()
            raise
        self.slot_bytes, self.owner = slot_bytes, True

    @classmethod
    def attach(cls, names: Sequence[str]) -> "SlotPool":
        """Attaches to existing segments without taking ownership (see the module docstring)."""
        pool = cls.__new__(cls)
        pool.segments, pool.owner = [], False
        for name in names:
            shm = shared_memory.SharedMemory(name, create=False)
            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (3.11: no track=False)
            pool.segments.append(shm)
        pool.slot_bytes = min(s.size for s in pool.segments)
        return pool

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def buf(self, slot: int) -> memoryview:
        return self.segments[slot].buf[:self.slot_bytes]

    def close(self) -> None:
        for s in self.segments:
            try:
                s.close()
            except BufferError:  # a view still exported: the mapping goes with the process
                pass

    def unlink(self) -> None:
        """Closes and (if owner) removes every segment; safe to call twice."""
        self.close()
        if getattr(self, "owner", True):
            for s in self.segments:
                try:
                    s.unlink()
                except FileNotFoundError:
                    pass
        self.segments = []


# ------------------------------------------------------------------------------------- client
class ScorerClient:
    """Trainer-side handle on a scorer process; also a `Scorer` (call it like one).

    command: argv that starts the server (``--address ADDR`` is appended), or None to connect to
      a server already listening at ``address`` (started by hand, e.g. on another device).
    slots / slot_bytes: the shared-memory slots (requests in flight at most / bytes per request,
      inputs + results).
    timeout: seconds a request may take (and the server may take to start).
    restart: on a dead server, start a new one and resend the requests in flight (else raise).
    """

    def __init__(self, command: Sequence[str] | None = None, *, address: str | None = None, slots: int = 2,
                 slot_bytes: int = 64 << 20, timeout: float = 600.0, restart: bool = False,
                 start_timeout: float = 300.0):
        if command is None and address is None:
            raise ValueError("give the server's command (started here) or the address of a running server")
        self.command, self.timeout, self.restart, self.start_timeout = command, timeout, restart, start_timeout
        self._dir = tempfile.mkdtemp(prefix="jaxedit-scorer-")
        self.address = address or os.path.join(self._dir, "socket")
        self._authkey = os.environ.get(AUTHKEY_ENV, "").encode() or secrets.token_hex(16).encode()
        self.pool = SlotPool(slots, slot_bytes)
        self._free = collections.deque(range(slots))
        self._pending: dict[int, tuple[int, list]] = {}  # request id -> (slot, request layout)
        self._done: dict[int, tuple[str, object]] = {}
        self._next_id, self.restarts = 0, 0
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.names: tuple[str, ...] = ()
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- process and connection
    def _start(self) -> None:
        if self.command is not None:
            self._log = open(os.path.join(self._dir, f"server-{self.restarts}.log"), "w+")
            env = {**os.environ, AUTHKEY_ENV: self._authkey.decode()}
            if os.path.exists(self.address):
                os.unlink(self.address)
            self.proc = subprocess.Popen([*self.command, "--address", self.address, "--exit-with-parent"],
                                         stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._check_alive()
            try:
                self.conn = connection.Client(self.address, family="AF_UNIX", authkey=self._authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise ScorerProcessError(f"no scorer server at {self.address} after {self.start_timeout:.0f} s"
                                             + self._stderr_tail())
                time.sleep(0.05)
        self.conn.send(("hello", self.pool.names, self.pool.slot_bytes))
        kind, names = self._recv(self.start_timeout, "the server's hello")
        if kind != "hello":
            raise ScorerProcessError(f"unexpected first message {kind!r} from the scorer server")
        self.names = tuple(names)

    def _stderr_tail(self, lines: int = 20) -> str:
        if self.proc is None or not hasattr(self, "_log"):
            return ""
        self._log.flush()
        self._log.seek(0)
        tail = self._log.read().splitlines()[-lines:]
        return "\nlast lines of the scorer process's output:\n  " + "\n  ".join(tail) if tail else ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ScorerProcessError(f"the scorer process (pid {self.proc.pid}) exited with code "
                                     f"{self.proc.returncode}" + self._stderr_tail())

    def _recv(self, timeout: float, what: str):
        """The next message, watching the server while waiting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.conn.poll(0.1):
                    return self.conn.recv()
            except (EOFError, OSError):
                self._check_alive()
                if self.proc is not None:  # closed the connection but still running: wait for the exit code
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                    self._check_alive()
                raise ScorerProcessError("the scorer server closed the connection" + self._stderr_tail())
            self._check_alive()
            if time.monotonic() > deadline:
                raise ScorerTimeout(f"timed out after {timeout:.0f} s waiting for {what}" + self._stderr_tail())

    def _recover(self, error: ScorerProcessError) -> None:
        """Restart a dead server and resend the requests in flight, or re-raise."""
        if not self.restart or self.command is None:
            raise error
        self._stop_process()
        self.restarts += 1
        print(f"jaxedit: scorer process died ({error.args[0].splitlines()[0]}); restart {self.restarts}",
              file=sys.stderr)
        self._start()
        for rid, (slot, layout) in self._pending.items():
            self.conn.send(("score", rid, slot, layout))

    def _receive_one(self, timeout: float, what: str) -> None:
        while True:
            try:
                msg = self._recv(timeout, what)
                break
            except ScorerTimeout:
                raise
            except ScorerProcessError as e:
                self._recover(e)
        kind, rid, slot, payload = msg
        if rid not in self._pending:
            return  # an answer to a request resent after a restart that the old server had answered
        self._pending.pop(rid)
        if kind == "done":
            self._done[rid] = ("done", unpack(self.pool.buf(slot), payload))
        else:
            self._done[rid] = ("error", payload)
        self._free.append(slot)

    # ------------------------------------------------------------------------------ requests
    def submit(self, **arrays: np.ndarray) -> int:
        """Sends one request (named arrays); returns its id. Waits while all slots are busy."""
        need = nbytes(arrays) + RESULT_BYTES
        if need > self.pool.slot_bytes:
            raise ValueError(f"request of {need / 2**20:.1f} MiB exceeds the {self.pool.slot_bytes / 2**20:.1f} MiB "
                             f"shared-memory slot (raise the scorer's slot size)")
        while not self._free:
            self._receive_one(self.timeout, "a free slot")
        slot = self._free.popleft()
        layout, _ = pack(arrays, self.pool.buf(slot))
        rid, self._next_id = self._next_id, self._next_id + 1
        self._pending[rid] = (slot, layout)
        try:
            self.conn.send(("score", rid, slot, layout))
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            self._recover(ScorerProcessError(f"sending request {rid} failed: {e}" + self._stderr_tail()))
        return rid

    def result(self, rid: int, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The scores of request ``rid`` (waits up to ``timeout``, default the client's)."""
        if rid not in self._done and rid not in self._pending:
            raise KeyError(f"unknown or already collected request id {rid}")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while rid not in self._done:
            self._receive_one(max(deadline - time.monotonic(), 0.0), f"request {rid}")
        kind, payload = self._done.pop(rid)
        if kind == "error":
            raise ScorerError(f"scorer process rejected request {rid}: {payload}")
        return payload

    def __call__(self, inputs, generated, styles, masks) -> dict[str, np.ndarray]:
        return self.result(self.submit(inputs=inputs, generated=generated, styles=styles, masks=masks))

    # ------------------------------------------------------------------------------- closing
    def _stop_process(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(("bye", None, None, None))
            except OSError:
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def close(self) -> None:
        """Stops the server (if started here) and unlinks the segments; safe to call twice."""
        atexit.unregister(self.close)
        try:
            self._stop_process()
        finally:
            self.pool.unlink()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ScorerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------- server
def serve(address: str, handler, names: Sequence[str], *, authkey: bytes | None = None, log=print) -> None:
    """Answers one client's requests until it says bye or disappears.

    handler(arrays: dict) -> {name: float32 (B,)}; a ValueError/TypeError it raises is sent back
    as that request's error (the server goes on). The segments are attached on the client's
    hello and detached (not unlinked) at the end.
    """
    authkey = authkey or os.environ.get(AUTHKEY_ENV, "").encode()
    if not authkey:
        raise ValueError(f"no authkey: set {AUTHKEY_ENV} (the client passes it to servers it starts)")
    with connection.Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        conn = listener.accept()
    pool = None
    try:
        kind, seg_names, _ = conn.recv()
        if kind != "hello":
            raise ScorerProcessError(f"expected the client's hello, got {kind!r}")
        pool = SlotPool.attach(seg_names)
        conn.send(("hello", list(names)))
        while True:
            try:
                kind, rid, slot, layout = conn.recv()
            except EOFError:
                log("scorer server: client gone, exiting")
                return
            if kind == "bye":
                return
            try:
                scores = handler(unpack(pool.buf(slot), layout, copy=False))  # the slot is ours until we answer
                out = {k: np.asarray(v, np.float32) for k, v in scores.items()}
                # After the request's arrays, which stay intact for a resend if we die now.
                end = max((o + np.dtype(d).itemsize * int(np.prod(sh)) for _, d, sh, o in layout), default=0)
                result_layout, _ = pack(out, pool.buf(slot), -(-end // ALIGN) * ALIGN)
                conn.send(("done", rid, slot, result_layout))
            except (ValueError, TypeError, KeyError) as e:
                conn.send(("error", rid, slot, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
        if pool is not None:
            pool.close()
