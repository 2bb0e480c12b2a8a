"""A small closed-loop load generator: fixed concurrency, fixed duration, one request body.

    python bench/loadgen.py http --url http://127.0.0.1:8000/v2/models/mlp/infer \
        --body body.json --concurrency 8 --duration 5 --warmup 1
    python bench/loadgen.py grpc --target 127.0.0.1:8001 --model mlp --input input:FP32:1x64 \
        --concurrency 8 --duration 5

Each of `concurrency` workers sends the next request as soon as its previous answer is in
(like perf_analyzer's concurrency mode). HTTP goes over raw asyncio streams with one
keep-alive connection per worker and a pre-encoded request, so the client spends as little
CPU as possible (it shares the machine with the server). gRPC uses grpc.aio with the KServe
v2 `ModelInfer` and raw_input_contents. Prints one JSON object: throughput, latency
percentiles (of requests that *started* inside the measurement window), errors, and the
versions that answered (from `x-model-version` / `model_version`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


class Recorder:
    def __init__(self, warmup: float, duration: float):
        self.t_start = time.perf_counter()
        self.t_measure = self.t_start + warmup
        self.t_end = self.t_measure + duration
        self.lat: list[float] = []
        self.ok = 0
        self.errors: Counter = Counter()
        self.versions: Counter = Counter()
        self.timeline: Counter = Counter()  # second since start -> completed requests
        self.err_timeline: Counter = Counter()

    def running(self) -> bool:
        return time.perf_counter() < self.t_end

    def record(self, t0: float, t1: float, ok: bool, version: str | None, err: str | None):
        sec = int(t1 - self.t_start)
        if ok:
            self.timeline[sec] += 1
        else:
            self.err_timeline[sec] += 1
        if t0 < self.t_measure or t0 >= self.t_end:
            return
        if ok:
            self.ok += 1
            self.lat.append(t1 - t0)
            if version is not None:
                self.versions[version] += 1
        else:
            self.errors[err or "error"] += 1

    def result(self, duration: float, dump: bool = False) -> dict:
        lat = np.sort(np.asarray(self.lat)) * 1e3
        pct = (lambda q: float(np.percentile(lat, q)) if lat.size else None)
        extra = {"lat_ms": [round(float(x), 4) for x in lat]} if dump else {}
        return {**extra, "requests": self.ok, "errors": sum(self.errors.values()),
                "error_kinds": dict(self.errors), "throughput": self.ok / duration,
                "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
                "max_ms": float(lat[-1]) if lat.size else None,
                "mean_ms": float(lat.mean()) if lat.size else None,
                "versions": dict(self.versions),
                "timeline": [self.timeline.get(s, 0) for s in range(int(self.t_end - self.t_start) + 1)],
                "error_timeline": [self.err_timeline.get(s, 0)
                                   for s in range(int(self.t_end - self.t_start) + 1)]}


# ---- HTTP over raw asyncio streams ----------------------------------------------------

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed by server")
    status = int(status_line.split(b" ", 2)[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(chunks)
    else:
        body = b""
    return status, headers, body


async def http_worker(rec: Recorder, host: str, port: int, request: bytes, check: bool):
    reader = writer = None
    while rec.running():
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, headers, body = await _read_response(reader)
            t1 = time.perf_counter()
            ok = status == 200
            if ok and check and b'"outputs"' not in body:
                ok = False
            rec.record(t0, t1, ok, headers.get("x-model-version"), None if ok else f"http {status}")
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            rec.record(t0, time.perf_counter(), False, None, type(e).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run_http(args) -> dict:
    u = urlsplit(args.url)
    body = Path(args.body).read_bytes()
    headers = [f"POST {u.path} HTTP/1.1", f"Host: {u.hostname}:{u.port}",
               "Content-Type: application/json", f"Content-Length: {len(body)}"]
    for h in args.header or []:
        headers.append(h)
    request = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
    rec = Recorder(args.warmup, args.duration)
    await asyncio.gather(*(http_worker(rec, u.hostname, u.port, request, not args.no_check)
                           for _ in range(args.concurrency)))
    return rec.result(args.duration, args.dump_latencies)


# ---- gRPC (KServe v2 ModelInfer) ------------------------------------------------------

def _grpc_request(model: str, inputs: list[str], seed: int = 0):
    from runtime.protocol.pb import grpc_service_pb2 as pb

    rng = np.random.default_rng(seed)
    req = pb.ModelInferRequest(model_name=model)
    for spec in inputs:
        name, dt, shape = spec.split(":")
        dims = [int(d) for d in shape.split("x")]
        if dt != "FP32":
            raise SystemExit("loadgen: only FP32 inputs are generated")
        arr = rng.standard_normal(dims).astype(np.float32)
        t = req.inputs.add()
        t.name, t.datatype = name, dt
        t.shape.extend(dims)
        req.raw_input_contents.append(arr.tobytes())
    return req


# gRPC over raw HTTP/2 frames: like the HTTP client above, the request is encoded once
# and only the stream id changes, so the client costs little of the machine it shares
# with the server (grpc.aio's client spends ~2x the CPU per call of the raw HTTP client).
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY = 0, 1, 3, 4, 6, 7
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
_WINDOW = (1 << 31) - 1


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _literal(name_index: int, value: str) -> bytes:
    """HPACK literal header field without indexing, name from the static table (index < 15)."""
    v = value.encode()
    return bytes((name_index, len(v))) + v  # values here are < 127 bytes: 7-bit length


class H2Connection:
    """One HTTP/2 connection carrying unary gRPC calls of one pre-encoded request: frames
    are read by one task and each stream's answer goes to the caller waiting on it. No
    HPACK decoding: a call succeeded when its stream carried a response message (gRPC
    errors arrive as a trailers-only HEADERS frame, or RST_STREAM)."""

    def __init__(self, host: str, port: int, path: str, message: bytes):
        block = (b"\x83\x86" + _literal(4, path) + _literal(1, f"{host}:{port}")  # POST http
                 + b"\x0f\x10" + bytes((16,)) + b"application/grpc"  # content-type (31)
                 + b"\x00\x02te\x08trailers")
        self.host, self.port = host, port
        self.head = len(block).to_bytes(3, "big") + bytes((_HEADERS, _END_HEADERS))
        self.block = block
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        self.data = len(body).to_bytes(3, "big") + bytes((_DATA, _END_STREAM))
        self.body = body
        self.next_id = 1
        self.waiting: dict[int, asyncio.Future] = {}
        self.got: dict[int, bytes] = {}
        self.out: list[bytes] = []

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(_PREFACE + _frame(_SETTINGS, 0, 0, b"\x00\x04" + _WINDOW.to_bytes(4, "big"))
                          + _frame(8, 0, 0, (_WINDOW - 65535).to_bytes(4, "big")))  # WINDOW_UPDATE
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def call(self) -> bytes | None:
        """One ModelInfer; the response message, or None for a gRPC error."""
        sid = self.next_id
        self.next_id += 2
        fut = asyncio.get_running_loop().create_future()
        self.waiting[sid] = fut
        s = sid.to_bytes(4, "big")
        if not self.out:  # one write per loop turn for every call started in it, as grpcio does
            asyncio.get_running_loop().call_soon(self._flush)
        self.out += (self.head, s, self.block, self.data, s, self.body)
        return await fut

    def _flush(self) -> None:
        self.writer.write(b"".join(self.out))
        self.out.clear()

    async def _read(self) -> None:
        read = self.reader.readexactly
        try:
            while True:
                h = await read(9)
                n, kind, flags, sid = int.from_bytes(h[:3], "big"), h[3], h[4], int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
                payload = await read(n) if n else b""
                if kind == _DATA:
                    self.got[sid] = self.got.get(sid, b"") + payload
                elif kind == _SETTINGS and not flags & _ACK:
                    self.writer.write(_frame(_SETTINGS, _ACK, 0, b""))
                elif kind == _PING and not flags & _ACK:
                    self.writer.write(_frame(_PING, _ACK, 0, payload))
                elif kind == _GOAWAY:
                    raise ConnectionError("server sent GOAWAY")
                if (kind in (_DATA, _HEADERS) and flags & _END_STREAM) or kind == _RST:
                    fut = self.waiting.pop(sid, None)
                    data = self.got.pop(sid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(data[5:] if data and len(data) > 5 else None)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection lost: {e!r}"))
            self.waiting.clear()

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def run_grpc(args) -> dict:
    from runtime.protocol.pb import grpc_service_pb2 as pb

    if args.client == "grpcio":
        return await run_grpcio(args)
    host, _, port = args.target.rpartition(":")
    msg = _grpc_request(args.model, args.input).SerializeToString()
    rec = Recorder(args.warmup, args.duration)
    conns = [H2Connection(host, int(port), "/inference.GRPCInferenceService/ModelInfer", msg)
             for _ in range(max(1, min(args.channels, args.concurrency)))]
    for c in conns:
        await c.open()
    parse = pb.ModelInferResponse.FromString

    async def worker(i: int):
        conn = conns[i % len(conns)]
        while rec.running():
            t0 = time.perf_counter()
            try:
                raw = await conn.call()
            except ConnectionError as e:
                rec.record(t0, time.perf_counter(), False, None, type(e).__name__)
                return
            t1 = time.perf_counter()
            resp = parse(raw) if raw is not None else None
            ok = resp is not None and len(resp.outputs) > 0
            rec.record(t0, t1, ok, (resp.model_version or None) if ok else None,
                       None if ok else "grpc error")

    try:
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    finally:
        for c in conns:
            await c.close()
    return rec.result(args.duration, args.dump_latencies)


async def run_grpcio(args) -> dict:
    """The same load through grpc.aio's client (`--client grpcio`)."""
    import grpc
    from runtime.protocol.pb import grpc_service_pb2_grpc as pbg

    req = _grpc_request(args.model, args.input)
    rec = Recorder(args.warmup, args.duration)
    # Each channel its own HTTP/2 connection (own subchannel pool): with --workers N one
    # connection lands on one worker, so --channels spreads the load over the workers.
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(args.target, options=opts)
                for _ in range(max(1, min(args.channels, args.concurrency)))]
    stubs = [pbg.GRPCInferenceServiceStub(ch) for ch in channels]

    async def worker(i: int):
        stub = stubs[i % len(stubs)]
        while rec.running():
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(req, timeout=30)
                rec.record(t0, time.perf_counter(), True, resp.model_version or None, None)
            except grpc.aio.AioRpcError as e:
                rec.record(t0, time.perf_counter(), False, None, f"grpc {e.code().name}")
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.01)

    try:
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    finally:
        for ch in channels:
            await ch.close()
    return rec.result(args.duration, args.dump_latencies)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("http", "grpc"):
        p = sub.add_parser(name)
        p.add_argument("--concurrency", "-c", type=int, default=1)
        p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
        p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
        p.add_argument("--dump-latencies", action="store_true",
                       help="include every latency (ms) in the output, to merge runs")
        if name == "http":
            p.add_argument("--url", required=True)
            p.add_argument("--body", required=True, help="file with the JSON request body")
            p.add_argument("--header", action="append", help="extra 'Name: value' header")
            p.add_argument("--no-check", action="store_true", help="do not look for outputs")
        else:
            p.add_argument("--target", required=True, help="host:port")
            p.add_argument("--model", required=True)
            p.add_argument("--input", action="append", required=True, help="NAME:FP32:1x64")
            p.add_argument("--channels", type=int, default=1,
                           help="gRPC connections (each lands on one worker of --workers N)")
            p.add_argument("--client", choices=("raw", "grpcio"), default="raw",
                           help="raw: pre-encoded HTTP/2 frames (cheap, the default); "
                                "grpcio: grpc.aio's client")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    res = asyncio.run(run_http(args) if args.mode == "http" else run_grpc(args))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
