#!/usr/bin/env python3
"""A small HTTP/3 client with a client certificate, on aioquic.

It sends one request and prints the response as JSON lines on stdout, each
flushed as soon as it is known, so a caller can watch a stream arrive:

    {"status": 200}
    {"headers": [["content-type", "text/event-stream"], ...]}
    {"chunk": "data: ...\\n\\n", "t": 0.012}   one per DATA frame, t = seconds since the request
    {"end": true}                           the stream ended normally

On failure the last line is {"error": "..."} and the exit status is 1
(e.g. the server refused the client certificate). With --cancel-after N the
client stops reading after N chunks (STOP_SENDING + RESET_STREAM), prints
{"cancelled": N} and closes the connection.

Run with the venv that `cargo xtask setup` makes: target/pyenv/bin/python.
"""

import argparse
import asyncio
import json
import ssl
import sys
import time
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset


def emit(obj):
    print(json.dumps(obj), flush=True)


class H3Client(QuicConnectionProtocol):
    """Turns QUIC events into HTTP/3 events, queued per connection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.events = asyncio.Queue()

    def quic_event_received(self, event):
        if isinstance(event, (ConnectionTerminated, StreamReset)):
            self.events.put_nowait(event)
        for h3_event in self.http.handle_event(event):
            self.events.put_nowait(h3_event)

    def cancel(self, stream_id):
        self._quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        self._quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        self.transmit()


async def run(args):
    url = urlparse(args.url)
    if url.scheme != "https" or not url.hostname:
        raise SystemExit(f"--url must be https://host:port/path, not {args.url!r}")
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.verify_mode = ssl.CERT_REQUIRED
    config.load_verify_locations(cafile=args.ca)
    if args.cert:
        config.load_cert_chain(args.cert, args.key)
    config.server_name = args.server_name or url.hostname
    port = url.port or 443
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    body = args.data.encode() if args.data is not None else None
    method = args.method or ("POST" if body is not None else "GET")

    async with connect(url.hostname, port, configuration=config, create_protocol=H3Client) as client:
        stream_id = client._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", url.netloc.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"bulkhead-h3-test-client"),
        ]
        if body is not None:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        client.http.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            client.http.send_data(stream_id, body, end_stream=True)
        client.transmit()
        start = time.monotonic()
        chunks = 0
        while True:
            event = await asyncio.wait_for(client.events.get(), timeout=args.timeout)
            if isinstance(event, ConnectionTerminated):
                emit({"error": f"connection closed: error {event.error_code:#x} {event.reason_phrase}"})
                return 1
            if isinstance(event, StreamReset) and event.stream_id == stream_id:
                emit({"error": f"stream reset: error {event.error_code:#x}"})
                return 1
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, HeadersReceived):
                fields = [(k.decode(), v.decode()) for k, v in event.headers]
                status = next((int(v) for k, v in fields if k == ":status"), None)
                emit({"status": status})
                emit({"headers": [[k, v] for k, v in fields if not k.startswith(":")]})
            elif isinstance(event, DataReceived):
                if event.data:
                    chunks += 1
                    emit({
                        "chunk": event.data.decode("utf-8", "replace"),
                        "t": round(time.monotonic() - start, 4),
                    })
                    if args.cancel_after is not None and chunks >= args.cancel_after:
                        client.cancel(stream_id)
                        emit({"cancelled": chunks})
                        return 0
            if getattr(event, "stream_ended", False):
                emit({"end": True})
                return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="https://host:port/path")
    parser.add_argument("--ca", required=True, help="PEM file of the CA that signed the server certificate")
    parser.add_argument("--cert", help="PEM file of the client certificate")
    parser.add_argument("--key", help="PEM file of the client key")
    parser.add_argument("--data", help="request body (JSON); makes the request a POST")
    parser.add_argument("--method", help="HTTP method (default GET, or POST with --data)")
    parser.add_argument("--server-name", help="TLS server name (default: the URL's host)")
    parser.add_argument("--cancel-after", type=int, help="stop reading after this many chunks")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each event")
    args = parser.parse_args()
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    try:
        return asyncio.run(run(args))
    except (ConnectionError, asyncio.TimeoutError, ssl.SSLError, OSError) as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
