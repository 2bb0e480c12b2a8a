"""The h2 transport's own cost per unary call, in-process and without a socket: the same
client frames (HEADERS + DATA, HPACK-indexed as a real client's) into one H2Connection on a
fake transport, the handler answering at once through the unary fast path (`try_send`).
Six windows of 20,000 calls; min and median us per call. Far less noisy than a loaded
end-to-end run, and it isolates what a change to h2conn.py costs:

    PYTHONPATH=. python bench/h2micro.py NAME          # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/h2micro.py before
"""
import asyncio, sys, time
import hpack
from runtime.server.grpc import h2conn
from runtime.server.grpc.h2conn import H2Connection, frame

class T:
    def __init__(self): self.n = 0
    def write(self, d): self.n += len(d)
    def get_extra_info(self, k): return ("127.0.0.1", 1)
    def set_write_buffer_limits(self, high=None, low=None): pass
    def is_closing(self): return False
    def close(self): pass
    def pause_reading(self): pass
    def resume_reading(self): pass

async def main():
    trailers = h2conn.encode_headers([(b"grpc-status", b"0")])
    def on_stream(s, end):
        def on_data(data, end):
            s.consumed(len(data))
            if end:
                s.try_send(b"\x00\x00\x00\x00\x10" + b"x" * 16, trailers, h2conn.STATUS_200_GRPC)
        s.on_data = on_data
    conn = H2Connection(on_stream, max_streams=1024, max_header_list=16384)
    t = T(); conn.connection_made(t)
    conn.data_received(h2conn.PREFACE + frame(h2conn.SETTINGS, 0, 0))
    conn._peer_initial = 1 << 30
    enc = hpack.Encoder()
    hdr = [(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
           (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
    body = b"\x00" + (300).to_bytes(4, "big") + bytes(300)
    N = 20000
    chunks = []
    sid = 1
    for _ in range(6 * N):
        chunks.append(frame(h2conn.HEADERS, 0x4, sid, enc.encode(hdr)) + frame(h2conn.DATA, 0x1, sid, body))
        sid += 2
    best = []
    it = iter(chunks)
    for rep in range(6):
        t0 = time.perf_counter()
        for _ in range(N):
            conn._peer_window = 1 << 30
            conn.data_received(next(it))
        assert not conn._streams and not conn.closed, (len(conn._streams), conn.closed)
        best.append((time.perf_counter() - t0) / N * 1e6)
    print(f"{sys.argv[1]}: us/call min {min(best):.2f} median {sorted(best)[3]:.2f}")

asyncio.run(main())
