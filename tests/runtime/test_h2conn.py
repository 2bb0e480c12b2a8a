"""runtime/server/grpc/h2conn.py's HPACK parts against the `hpack` package's own coder: our
cached decoding must give what a plain decoder gives, call after call, through table
insertions, evictions and size updates; our stateless encoder must decode as sent."""

from __future__ import annotations

import asyncio

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from runtime.server.grpc.h2conn import H2Connection, encode_headers

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

NAMES = [":path", ":authority", "content-type", "te", "x-user-id", "grpc-timeout", "x-a", "x-b"]
header = st.tuples(st.sampled_from(NAMES), st.text("abcdefgh/0123456789", min_size=0, max_size=40))
block = st.lists(header, min_size=1, max_size=6)
step = st.one_of(block.map(lambda b: ("send", b)), st.sampled_from([0, 64, 256, 4096]).map(lambda n: ("size", n)))


def _conn() -> H2Connection:
    async def make():
        return H2Connection(lambda s, e: None, max_streams=8, max_header_list=1 << 16)
    return asyncio.run(make())


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=40), st.integers(1, 5))
def test_cached_decoding_equals_a_plain_decoder(steps, repeats):
    conn = _conn()
    enc, plain = hpack.Encoder(), hpack.Decoder()
    for kind, arg in steps:
        if kind == "size":
            enc.header_table_size = arg  # the next block starts with a size update
            continue
        for _ in range(repeats):  # the same headers again: often the same bytes
            data = enc.encode(arg)
            try:
                want = plain.decode(data)
            except hpack.HPACKError:
                # hpack's encoder sends only the last of two size changes between blocks
                # (RFC 7541 4.2 wants the smallest too): the reference is out of step
                return
            assert [tuple(h) for h in conn._decode(data)] == [tuple(h) for h in want]


def test_the_same_block_after_a_table_change_is_decoded_again():
    conn = _conn()
    enc, plain = hpack.Encoder(), hpack.Decoder()
    first = enc.encode([("x-a", "one")])          # inserted: index 62 is x-a: one
    plain.decode(first), conn._decode(first)
    ref = enc.encode([("x-a", "one")])            # b"\xbe": refers to the table
    assert conn._decode(ref) == plain.decode(ref)
    change = enc.encode([("x-b", "two")])         # now 62 is x-b: two
    plain.decode(change), conn._decode(change)
    again = b"\xbe"                               # the same bytes mean something else now
    assert [tuple(h) for h in conn._decode(again)] == [tuple(h) for h in plain.decode(again)] == [("x-b", "two")]


def test_encoded_headers_decode_as_sent():
    headers = [(":status", "200"), ("x-long", "v" * 300), (b"grpc-status", b"0"), ("x-" + "n" * 200, "é")]
    got = hpack.Decoder().decode(encode_headers(headers), raw=True)
    assert got == [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
                   for n, v in headers]
