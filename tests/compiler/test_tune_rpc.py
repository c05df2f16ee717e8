"""Tuning through TVM's RPC on loopback: a tracker and two servers that the test starts and stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
pytest.importorskip("cloudpickle", reason="TVM's RPC tracker and server need cloudpickle (pip install cloudpickle)")

from pgen import tune, tuning_log  # noqa: E402
from pgen.rpc import RpcRunner, parse_tracker  # noqa: E402
from pgen_runtime.errors import TuneError  # noqa: E402
from pgen_runtime.spec import AttentionSpec  # noqa: E402
from pgen import schedules

SPEC = AttentionSpec(num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype="float32")
WORKLOAD = {"decode": {"seq_lens": [256, 256]}, "extend": {"seq_lens": [96, 64], "new_tokens": [32, 16]}}
KEY = "pgen-test"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
    # Own session: stopping the group also stops the worker process TVM starts under each.
    return subprocess.Popen([sys.executable, "-m", *args, "--host", "127.0.0.1", "--silent"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tracker():
    """HOST:PORT of a tracker with two servers registered under KEY."""
    from tvm import rpc

    port = _free_port()
    procs = [_start("tvm.exec.rpc_tracker", "--port", str(port), "--port-end", str(port + 1))]
    try:
        for _ in range(2):
            server_port = _free_port()
            procs.append(_start("tvm.exec.rpc_server", "--port", str(server_port), "--port-end", str(server_port + 1),
                                "--tracker", f"127.0.0.1:{port}", "--key", KEY))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if len(rpc.connect_tracker("127.0.0.1", port).summary()["server_info"]) == 2:
                    break
            except (OSError, RuntimeError):
                pass
            assert time.monotonic() < deadline, "the RPC tracker and servers did not start in time"
            assert all(p.poll() is None for p in procs), "an RPC process exited at start"
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)


def test_tune_through_two_servers(tracker, tmp_path):
    runner = RpcRunner(tracker, KEY, session_timeout=60)
    assert runner.workers == 2
    path = tune.tune(SPEC, "llvm", ("decode", "extend"), 2, WORKLOAD, tmp_path, runner=runner)
    data = tuning_log.load(path, SPEC, "llvm")
    assert data["device"]["rpc"] == f"{KEY}@{tracker}"
    assert len(data["records"]) == 4
    for rec in data["records"]:
        assert rec["error"] is None and rec["median_ms"] > 0 and len(rec["times_ms"]) == 10, rec
    # Resumable like a local run: nothing is measured again.
    again = tune.tune(SPEC, "llvm", ("decode", "extend"), 2, WORKLOAD, tmp_path, runner=runner)
    assert len(tuning_log.load(again)["records"]) == 4


def test_remote_failure_gets_infinite_time(tracker, tmp_path):
    bogus = tmp_path / "kernels.so"
    bogus.write_bytes(b"not a shared library")
    cand = tune.Candidate("decode", {"vector_lanes": 16, "kv_heads_per_task": 2, "max_splits": 8},
                          WORKLOAD["decode"], "bogus", False)
    record = tune._time(RpcRunner(tracker, KEY), SPEC, cand, bogus)
    assert record["median_ms"] is None and record["error"]


def test_no_server_under_key_is_a_clear_error(tracker):
    with pytest.raises(TuneError, match="no RPC server is registered under key 'nobody'"):
        RpcRunner(tracker, "nobody")


@pytest.mark.parametrize("text", ["localhost", "host:port", ":9190"])
def test_bad_tracker_address(text):
    with pytest.raises(TuneError, match="HOST:PORT"):
        parse_tracker(text)


def test_unreachable_tracker_fails_fast():
    start = time.monotonic()
    with pytest.raises(TuneError, match="cannot reach the RPC tracker"):
        RpcRunner(f"127.0.0.1:{_free_port()}", KEY)
    assert time.monotonic() - start < 10


def test_remote_candidate_with_a_wrong_output_gets_infinite_time_guard_step_timed_too(tracker, tmp_path, monkeypatch):
    from pgen import rpc
    from pgen.target import parse_targets

    target = parse_targets("llvm")[0]
    config = schedules.default_config("decode", SPEC, target.info)
    library = tune._build_candidate(SPEC, target, "decode", config, tmp_path / "cand")
    # With a guard step (pgen_runtime.measure.GPU_DECODE_GUARD): timed and checked there too.
    cand = tune.Candidate("decode", config, {**WORKLOAD["decode"], "guard": {"seq_lens": [600]}}, "k", True)
    record = tune._time(RpcRunner(tracker, KEY), SPEC, cand, library)
    assert record["error"] is None and record["guard_ms"] > 0
    right = rpc.reference_output
    monkeypatch.setattr(rpc, "reference_output", lambda *args: right(*args) * 1.01)
    record = tune._time(RpcRunner(tracker, KEY), SPEC, cand, library)
    assert record["median_ms"] is None and "wrong result" in record["error"]
