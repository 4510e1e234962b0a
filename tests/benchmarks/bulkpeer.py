"""
Both ends of the duplex transfer: SIZE bytes each way at once over one TCP
connection, with SHA-256 of what each end receives.

    python -m tests.benchmarks.bulkpeer serve PORT SIZE
    python -m tests.benchmarks.bulkpeer send PORT SIZE

The client sends an 8-byte size, then the client-to-server stream while the
server sends the server-to-client stream of the same size.  Each end hashes
what it received once the transfer is over, so SHA-256 (which would
otherwise cap the rate on the load CPU) is outside the timed part; the server
then sends its 32-byte digest, and the client prints both digests for the
caller to compare with L{expected_digests}.  Both streams are generated
from fixed seeds before the transfer, one MiB block at a time with the
block's number in its first 8 bytes, so a lost, repeated or reordered block
changes the digest.  Each end holds both streams in memory (2 x SIZE).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

BLOCK = 1 << 20
PAGE = 4096
UP_SEED, DOWN_SEED = 1, 2
_LOOPBACK = "127.0.0.1"


def blocks(seed: int, size: int) -> Iterator[bytes]:
    """The blocks of the stream generated from C{seed}, C{size} bytes in all."""
    base = random.Random(seed).randbytes(BLOCK)[8:]
    made, number = 0, 0
    while made < size:
        block = (struct.pack("!Q", number) + base)[: size - made]
        yield block
        made += len(block)
        number += 1


def expected_digests(size: int) -> dict[str, str]:
    """What each end must have received: C{up} (at the server) and C{down}."""
    digests = {}
    for name, seed in (("up", UP_SEED), ("down", DOWN_SEED)):
        h = hashlib.sha256()
        for block in blocks(seed, size):
            h.update(block)
        digests[name] = h.hexdigest()
    return digests


def _receive_into(connection: socket.socket, buffer: bytearray) -> None:
    """Fill C{buffer} from C{connection}."""
    view = memoryview(buffer)
    done = 0
    while done < len(buffer):
        n = connection.recv_into(view[done:], min(BLOCK, len(buffer) - done))
        if not n:
            raise ConnectionError(f"stream ended {len(buffer) - done} bytes early")
        done += n


def _receive_buffer(size: int) -> bytearray:
    """A buffer for C{size} bytes with every page already mapped (no page faults while timed)."""
    buffer = bytearray(size)
    memoryview(buffer)[::PAGE] = bytes(len(range(0, size, PAGE)))
    return buffer


def _transfer(connection: socket.socket, outgoing: bytes, incoming: bytearray) -> None:
    """Send C{outgoing} while filling C{incoming}."""
    sender = threading.Thread(target=connection.sendall, args=(outgoing,))
    sender.start()
    _receive_into(connection, incoming)
    sender.join()


def serve(port: int, size: int) -> None:
    """Serve transfers of C{size} bytes, one at a time, until killed."""
    outgoing = b"".join(blocks(DOWN_SEED, size))
    received = _receive_buffer(size)
    listener = socket.create_server((_LOOPBACK, port), backlog=16)
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                header = bytearray(8)
                _receive_into(connection, header)
                if struct.unpack("!Q", header)[0] != size:
                    continue
                _transfer(connection, outgoing, received)
                connection.sendall(hashlib.sha256(received).digest())
                connection.shutdown(socket.SHUT_WR)
                connection.recv(1)  # b"" once the client has closed
            except ConnectionError:
                continue


def send(port: int, size: int) -> dict[str, object]:
    """One transfer through C{port}: its duration and both digests."""
    outgoing = b"".join(blocks(UP_SEED, size))
    received = _receive_buffer(size)
    with socket.create_connection((_LOOPBACK, port), timeout=600) as connection:
        began = time.monotonic()
        connection.sendall(struct.pack("!Q", size))
        _transfer(connection, outgoing, received)
        seconds = time.monotonic() - began
        up = bytearray(32)
        _receive_into(connection, up)
    return {"seconds": seconds, "size": size, "up": up.hex(),
            "down": hashlib.sha256(received).hexdigest()}


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] in ("serve", "send"):
        port, size = int(argv[1]), int(argv[2])
        if argv[0] == "serve":
            serve(port, size)
        else:
            print(json.dumps(send(port, size)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
