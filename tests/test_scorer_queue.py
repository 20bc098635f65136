"""Shared-memory scorer transport: round trips, concurrency, backpressure, malformed frames,
dead servers (error and restart), and no leaked /dev/shm segments on any exit path."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxedit.scorers import shm_queue
from jaxedit.scorers.shm_queue import ScorerClient, ScorerError, ScorerProcessError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = [sys.executable, "-m", "jaxedit.scorers.server"]


def _segments():
    return {f for f in os.listdir("/dev/shm") if f.startswith("jaxedit-")}


@pytest.fixture(autouse=True)
def no_leaks():
    before = _segments()
    yield
    time.sleep(0.2)
    assert _segments() - before == set(), "shared-memory segments left behind"


def _batch(seed, b=3, h=8, w=10):
    rng = np.random.default_rng(seed)
    return dict(inputs=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
                generated=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
                styles=rng.integers(0, 256, (b, 5, 7, 3), dtype=np.uint8),
                masks=rng.integers(0, 2, (b, h, w)).astype(np.float32))


def _expected(batch):
    g, m = batch["generated"], batch["masks"]
    return g.reshape(len(g), -1).sum(1), m.reshape(len(m), -1).sum(1)


def _server(scorer, **kwargs):
    return SERVER + [f"--scorer={scorer}", f"--kwargs={json.dumps(kwargs)}"]


def test_pack_unpack_roundtrip():
    buf = memoryview(bytearray(4096))
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.uint8),
              "c": np.zeros((0, 3), np.int64)}
    layout, end = shm_queue.pack(arrays, buf)
    assert all(off % shm_queue.ALIGN == 0 for *_, off in layout) and end <= shm_queue.nbytes(arrays)
    out = shm_queue.unpack(buf, layout)
    for k in arrays:
        np.testing.assert_array_equal(out[k], arrays[k])
        assert out[k].dtype == arrays[k].dtype
    with pytest.raises(ValueError, match="slot has 4096"):
        shm_queue.pack({"big": np.zeros(5000, np.uint8)}, buf)
    with pytest.raises(ValueError, match="does not fit the slot"):
        shm_queue.unpack(buf, [("x", "<f4", (2000,), 0)])


def test_round_trip_in_order_and_out_of_order():
    with ScorerClient(_server("tests.scorer_fakes:Sums"), slots=3, slot_bytes=1 << 20) as client:
        assert client.names == ("structural", "semantic")
        batches = [_batch(i) for i in range(7)]
        rids = [client.submit(**b) for b in batches[:3]]       # all slots busy
        rids += [client.submit(**b) for b in batches[3:]]      # backpressure: waits for free slots
        for i in [6, 0, 3, 5, 1, 2, 4]:                        # collected out of order
            got = client.result(rids[i])
            struct, sem = _expected(batches[i])
            np.testing.assert_array_equal(got["structural"], struct)
            np.testing.assert_array_equal(got["semantic"], sem)
        with pytest.raises(KeyError, match="already collected"):
            client.result(rids[0])
        # The Scorer interface, and the real weight-free scorer behind the queue.
        b = _batch(9)
        np.testing.assert_array_equal(client(**b)["structural"], _expected(b)[0])


def test_simple_scorer_through_the_queue_equals_in_process():
    from jaxedit.scorers import make_scorer
    b = _batch(3, h=16, w=16)
    b["styles"] = b["styles"][:, :, :, :]
    with ScorerClient(_server("simple", lam=0.05), slot_bytes=1 << 20) as client:
        got = client(**b)
    want = make_scorer("simple", lam=0.05)(*b.values())
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_malformed_requests_are_rejected_and_the_server_goes_on():
    with ScorerClient(_server("tests.scorer_fakes:Sums"), slot_bytes=1 << 20) as client:
        bad = _batch(0)
        bad["generated"] = bad["generated"].astype(np.float32)
        with pytest.raises(ScorerError, match="generated must be uint8"):
            client(**bad)
        bad = _batch(0)
        bad["masks"] = bad["masks"][:, :4]
        with pytest.raises(ScorerError, match=r"masks must be \(B, H, W\)"):
            client(**bad)
        with pytest.raises(ScorerError, match="request lacks"):
            client.result(client.submit(inputs=_batch(0)["inputs"]))
        with pytest.raises(ValueError, match="exceeds the 1.0 MiB shared-memory slot"):
            client.submit(**_batch(0, b=4, h=256, w=256))
        good = _batch(1)
        np.testing.assert_array_equal(client(**good)["semantic"], _expected(good)[1])


def test_dead_server_is_a_clear_error(tmp_path):
    marker = str(tmp_path / "died")
    with ScorerClient(_server("tests.scorer_fakes:DiesOnce", marker=marker), slot_bytes=1 << 20) as client:
        rid = client.submit(**_batch(0))
        with pytest.raises(ScorerProcessError, match=r"exited with code 3(.|\n)*DiesOnce: dying now"):
            client.result(rid)


def test_dead_server_is_restarted_and_requests_resent(tmp_path):
    marker = str(tmp_path / "died")
    with ScorerClient(_server("tests.scorer_fakes:DiesOnce", marker=marker), slot_bytes=1 << 20,
                      restart=True) as client:
        batches = [_batch(i) for i in range(2)]
        rids = [client.submit(**b) for b in batches]  # the server dies on the first
        for rid, b in zip(rids, batches):
            np.testing.assert_array_equal(client.result(rid)["structural"], _expected(b)[0])
        assert client.restarts == 1


def test_timeout_names_the_request():
    with ScorerClient(_server("tests.scorer_fakes:Sums", delay=3.0), slot_bytes=1 << 20) as client:
        rid = client.submit(**_batch(0))
        with pytest.raises(shm_queue.ScorerTimeout, match=f"waiting for request {rid}"):
            client.result(rid, timeout=0.5)


def test_bad_server_command_names_its_output():
    with pytest.raises(ScorerProcessError, match=r"exited with code(.|\n)*unknown scorer 'nope'"):
        ScorerClient(_server("nope"), slot_bytes=1 << 20)


CLIENT = textwrap.dedent("""
    import sys, time, numpy as np
    from jaxedit.scorers.shm_queue import ScorerClient
    c = ScorerClient([sys.executable, "-m", "jaxedit.scorers.server", "--scorer=tests.scorer_fakes:Sums",
                      '--kwargs={"delay": 30}'], slot_bytes=1 << 20)
    b = np.zeros((1, 4, 4, 3), np.uint8)
    c.submit(inputs=b, generated=b, styles=b, masks=np.zeros((1, 4, 4), np.float32))
    print(c.proc.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_client_leaves_no_segment_and_no_server(sig):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server_pid = int(proc.stdout.readline())
    assert _segments()  # in use now
    proc.send_signal(sig)
    proc.wait(30)
    deadline = time.time() + 30
    while (_segments() or _alive(server_pid)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(server_pid), "the server outlived its client"
    # (the no_leaks fixture checks /dev/shm)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped by a dead parent) is gone
        return f.read().split(")")[-1].split()[0] != "Z"
