"""Counts UDP datagrams per source port and the skb mark each one carried.

Runs inside a network namespace and cgroup made by a kernel data plane test.
Reads the mark of every datagram with SO_RCVMARK; prints one JSON object
when no datagram has arrived for --idle-ms or --max-ms has passed.
"""

import argparse
import json
import socket
import struct
import sys
import time

SO_RCVMARK = getattr(socket, "SO_RCVMARK", 75)
SO_MARK = getattr(socket, "SO_MARK", 36)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True, help="address:port")
    parser.add_argument("--idle-ms", type=int, default=1000)
    parser.add_argument("--max-ms", type=int, default=30000)
    parser.add_argument("--ready-file", help="written once the socket is bound")
    args = parser.parse_args()
    host, port = args.bind.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
    sock.bind((host.strip("[]"), int(port)))
    sock.settimeout(args.idle_ms / 1000)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write("ready\n")
    per_port: dict[int, dict] = {}
    unmarked = 0
    start = time.monotonic()
    first_packet = None
    while time.monotonic() - start < args.max_ms / 1000:
        try:
            data, ancdata, _flags, addr = sock.recvmsg(65535, socket.CMSG_SPACE(4))
        except socket.timeout:
            if first_packet is not None:
                break
            continue
        if first_packet is None:
            first_packet = time.monotonic()
        mark = None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_MARK and len(cdata) >= 4:
                mark = struct.unpack("=I", cdata[:4])[0]
        entry = per_port.setdefault(addr[1], {"packets": 0, "bytes": 0, "marks": {}})
        entry["packets"] += 1
        entry["bytes"] += len(data)
        if mark is None:
            unmarked += 1
        else:
            entry["marks"][str(mark)] = entry["marks"].get(str(mark), 0) + 1
    json.dump({"ports": {str(k): v for k, v in per_port.items()}, "unmarked": unmarked}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
