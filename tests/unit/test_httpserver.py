"""The HTTP layer on a real h11 state machine over an in-memory trio stream: limits, timeouts,
keep-alive, framing and hang-ups, without a socket or root."""

from __future__ import annotations

import json
import re
from typing import Any

import trio
import trio.testing

from imaged.server.httpserver import Connection, Emit, Limits, Request, Response, StreamResponse

FAST = Limits(max_header_bytes=1024, max_body_bytes=100, idle_seconds=0.3, body_seconds=0.3,
              send_seconds=0.3)


async def echo(request: Request) -> Response:
    return Response(200, {"method": request.method, "path": request.path,
                          "segments": request.segments, "query": request.query,
                          "body": request.body.decode()})


async def _read_all(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    with trio.move_on_after(2):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


async def exchange(raw: bytes, handler: Any = echo, limits: Limits = FAST) -> bytes:
    """Send ``raw``, let the server run until it closes, return all it sent."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server, handler, limits).serve)
        await client.send_all(raw)
        return await _read_all(client)


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


async def test_keep_alive_serves_requests_in_turn() -> None:
    out = await exchange(b"GET /v1/a HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /v1/b?force=true HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\n\r\n{}")
    assert statuses(out) == [200, 200]
    assert b'"query": {"force": ["true"]}' in out and b'"body": "{}"' in out


async def test_segments_are_decoded_after_splitting() -> None:
    out = await exchange(b"GET /v1/images/127.0.0.1%3A5000%2Frepo%3Atag HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\n\r\n")
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["segments"] == ["v1", "images", "127.0.0.1:5000/repo:tag"]


async def test_body_over_limit_is_413_without_reading_it() -> None:
    out = await exchange(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    assert statuses(out) == [413]
    assert b'"code": "invalid"' in out


async def test_chunked_body_over_limit_is_413() -> None:
    chunk = b"%x\r\n%s\r\n" % (150, b"a" * 150)
    out = await exchange(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk)
    assert statuses(out) == [413]


async def test_headers_over_limit_are_refused() -> None:
    out = await exchange(b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    assert statuses(out) == [431]


async def test_malformed_request_is_400() -> None:
    out = await exchange(b"NOT HTTP AT ALL\r\n\r\n")
    assert statuses(out) == [400]
    assert b"malformed HTTP request" in out


async def test_silent_client_is_dropped_after_idle_timeout() -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(2):  # the connection ends by itself, well before this
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server, echo, FAST).serve)
            assert await _read_all(client) == b""


async def test_slow_header_drip_is_cut_off() -> None:
    client, server = trio.testing.memory_stream_pair()
    sent = 0
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server, echo, FAST).serve)
            try:
                for byte in b"GET /v1/x HTTP/1.1\r\nHost: x\r\n":
                    await client.send_all(bytes([byte]))
                    sent += 1
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                pass
    assert sent < 20  # the server hung up long before the head was complete


async def test_body_that_never_comes_gets_408() -> None:
    out = await exchange(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert statuses(out) == [408]


async def test_stream_sends_ndjson_and_a_hangup_cancels_the_producer() -> None:
    cancelled = trio.Event()
    sent_first = trio.Event()

    async def produce(emit: Emit) -> None:
        try:
            await emit({"status": "one"})
            sent_first.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(200, produce)

    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server, handler, FAST).serve)
            await client.send_all(b"POST /v1/images/pull HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 0\r\n\r\n")
            await sent_first.wait()
            head = await client.receive_some()
            assert b"application/x-ndjson" in head
            await client.aclose()
            await cancelled.wait()


async def test_stream_ends_with_the_last_object() -> None:
    async def handler(request: Request) -> StreamResponse:
        async def produce(emit: Emit) -> None:
            for i in range(3):
                await emit({"n": i})

        return StreamResponse(200, produce)

    out = await exchange(b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", handler)
    body = out.split(b"\r\n\r\n", 1)[1]
    lines = [line for line in body.split(b"\r\n") if line.startswith(b"{")]
    assert [json.loads(line) for line in lines] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert body.endswith(b"0\r\n\r\n")  # chunked framing closed properly
