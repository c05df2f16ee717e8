"""Remote measurement through TVM's RPC: a tracker hands out servers (GPUs, edge boards) by key.

Candidates are built on this host. Each is timed in its own session requested from the tracker (one
request per candidate), so as many candidates are timed at once as servers are registered under the
key. In a session the library is uploaded and loaded; inputs made here (random data, valid block
tables in random order, lengths from the workload) are copied to the remote device; the plan
(split-KV factor, query tiles) is computed here exactly as `PagedKernels` computes it on that
device; and the kernel symbol is timed by the remote module's time_evaluator (one warm-up call,
then the median of `repeats` timings of at least `min_repeat_ms` each). A candidate that fails
remotely gets an infinite time and the run goes on.

NOTE: a remote CPU is assumed to be the same CPU model as this host (candidates are compiled for
this host's `-mcpu` and logged under its target id). Every session uploads its own inputs: with a
long-context workload over a slow network that costs more than the timing itself.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from pgen_runtime.errors import TuneError
from pgen_runtime.kernels import decode_splits, extend_q_tiles, extend_splits
from pgen_runtime.measure import check_output, make_arrays, reference_output
from pgen_runtime.spec import AttentionSpec

from .target import host_target_id
from .tune import Candidate

CONNECT_TIMEOUT_S = 5


def parse_tracker(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port).

    Raises:
        TuneError: not HOST:PORT with a numeric port.
    """
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit():
        raise TuneError(f"--rpc-tracker {text!r} must be HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


class RpcRunner:
    """Times candidates on the servers a TVM RPC tracker holds under `key`.

    Args:
        tracker: "HOST:PORT" of the tracker (python -m tvm.exec.rpc_tracker).
        key: the key the servers registered with (python -m tvm.exec.rpc_server --key).
        device_kind: "cpu" or "cuda": which device of the server runs the kernels.
        session_timeout: seconds after which a server ends a session (a hung candidate).
    """

    overlap = True

    def __init__(self, tracker: str, key: str, device_kind: str = "cpu", session_timeout: float = 120,
                 repeats: int = 10, min_repeat_ms: int = 20) -> None:
        from tvm import rpc

        self.host, self.port = parse_tracker(tracker)
        self.key, self.kind = key, device_kind
        self.session_timeout, self.repeats, self.min_repeat_ms = session_timeout, repeats, min_repeat_ms
        self._expected: dict[str, np.ndarray | None] = {}  # float64 reference per kernel and workload
        try:
            # TVM's own connect retries for a minute; a closed port should fail at once.
            socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S).close()
            summary = rpc.connect_tracker(self.host, self.port).summary()
        except (OSError, RuntimeError) as err:
            raise TuneError(f"cannot reach the RPC tracker at {tracker} ({err}); start it with "
                            f"python -m tvm.exec.rpc_tracker --port {self.port}") from None
        servers = [s for s in summary.get("server_info", []) if s.get("key") == f"server:{key}"]
        if not servers:
            raise TuneError(f"no RPC server is registered under key {key!r} at {tracker}; start one with "
                            f"python -m tvm.exec.rpc_server --tracker {tracker} --key {key}")
        self.workers = len(servers)
        self._device: dict[str, Any] | None = None

    def device_info(self) -> dict[str, Any]:
        """Name, arch and parallelism of the remote device (asked once, from one session)."""
        if self._device is None:
            session = self._session()
            if self.kind == "cuda":
                dev = session.cuda(0)
                if not dev.exist:
                    raise TuneError(f"the RPC servers under key {self.key!r} have no CUDA device")
                major, minor = str(dev.compute_version).split(".")
                self._device = {"kind": "cuda", "name": str(dev.device_name), "arch": f"sm_{major}{minor}",
                                "parallelism": 2 * int(dev.multi_processor_count)}
            else:
                threads = int(session.get_function("runtime.NumThreads")())
                self._device = {"kind": "cpu", "name": host_target_id(), "parallelism": threads}
            self._device["rpc"] = f"{self.key}@{self.host}:{self.port}"
        return self._device

    def measure(self, spec: AttentionSpec, cand: Candidate, library: Path) -> dict[str, Any]:
        """Upload, load and time one candidate in a fresh session; raises on any remote failure."""
        session = self._session()
        remote_name = f"{cand.key}.so"
        session.upload(str(library), remote_name)
        module = session.load_module(remote_name)
        dev = session.cuda(0) if self.kind == "cuda" else session.cpu(0)
        times = self._time(spec, cand, module, dev)
        result = {"times_ms": times, "median_ms": statistics.median(times), "error": None}
        if cand.workload.get("guard"):
            guard = dataclasses.replace(cand, workload=cand.workload["guard"])
            result["guard_ms"] = statistics.median(self._time(spec, guard, module, dev))
        return result

    def _time(self, spec: AttentionSpec, cand: Candidate, module, dev) -> list[float]:
        host = kernel_args(spec, cand, self.device_info()["parallelism"], self.kind)
        args = [_remote(a, dtype, dev) if isinstance(a, np.ndarray) else a for a, dtype in host]
        timer = module.time_evaluator(cand.kernel, dev, number=1, repeat=self.repeats,
                                      min_repeat_ms=self.min_repeat_ms)
        times = [t * 1e3 for t in timer(*args).results]
        # The output must match the float64 reference: a wrong candidate never becomes a tuned config.
        key = json.dumps([cand.kernel, cand.workload], sort_keys=True)
        if key not in self._expected:
            arrays = host[:6] if cand.kernel == "extend" else [host[0], host[1], host[2], host[4], host[5]]
            self._expected[key] = reference_output(spec, cand.kernel, tuple(arrays))
        check_output(spec, args[5].numpy(), self._expected[key])
        return times

    def _session(self):
        from tvm import rpc

        try:
            return rpc.connect_tracker(self.host, self.port).request(self.key, session_timeout=self.session_timeout)
        except (OSError, RuntimeError) as err:
            raise TuneError(f"no RPC session for key {self.key!r} from {self.host}:{self.port}: {err}") from None


def kernel_args(spec: AttentionSpec, cand: Candidate, parallelism: int, kind: str) -> list[tuple[Any, str]]:
    """The full argument list of a decode/extend kernel symbol as host values, planned for the device.

    The symbols take (q, kv_pool, block_tables, q_indptr, seq_lens, out, num_splits, max_q_tiles);
    decode gets q_indptr = 0..batch and one query tile; both get the split-KV factor their plan would.
    """
    arrays = make_arrays(spec, cand.kernel, cand.workload)
    if cand.kernel == "decode":
        q, pool, tables, lens, out = arrays
        indptr = (np.arange(len(lens[0]) + 1, dtype=np.int32), "int32")
        splits = decode_splits(spec, cand.config, lens[0], kind, parallelism)
        return [q, pool, tables, indptr, lens, out, (splits, "int32"), (1, "int32")]
    if cand.kernel == "extend":
        q, pool, tables, indptr, lens, out = arrays
        tiles = extend_q_tiles(cand.config, np.diff(indptr[0]), kind)
        splits = extend_splits(spec, cand.config, np.diff(indptr[0]), lens[0], kind, parallelism)
        return [q, pool, tables, indptr, lens, out, (splits, "int32"), (tiles, "int32")]
    raise TuneError(f"RPC tuning times decode and extend; {cand.kernel!r} has no knobs to tune")


def _remote(array: np.ndarray, dtype: str, dev):
    import tvm

    tensor = tvm.runtime.empty(array.shape, dtype, dev)
    tensor.copyfrom(array)  # bfloat16 arrives as its uint16 bits, which copyfrom takes as they are
    return tensor
