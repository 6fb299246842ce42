"""The redis strategy writes its commands and reads their replies itself (the lock's hot path):
what it writes must be what redis-py writes, and what it reads must be what the server meant,
however the bytes arrive, in RESP2 and RESP3. No server is needed here."""

from __future__ import annotations

import pytest

redis = pytest.importorskip("redis")

from redis.connection import Connection  # noqa: E402
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError  # noqa: E402

from django_isolatable import CommandIsolation, LockIOError  # noqa: E402
from django_isolatable.backends import redis as strategy  # noqa: E402

PARSE_ERROR = Connection()._parser.parse_error


class Chunked:
    """A socket whose ``recv`` hands out ``data`` ``size`` bytes at a time, then b"" (closed)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.chunks = [data[i : i + size] for i in range(0, len(data), size)]
        self.calls = 0

    def recv(self, _limit: int) -> bytes:
        self.calls += 1
        return self.chunks.pop(0) if self.chunks else b""


COMMANDS = (
    ("EVALSHA", "a" * 40, 2, b"p:isolatable:lock:n", b"p:isolatable:taken:" + b"f" * 32, 30000),
    ("BLPOP", b"\x00\xffbinary\r\nkey", b"wake", 0.2),
    ("SET", b"k", 'tok {"argv": ["ünïcode 🔒"]}\n', "NX", "PX", 1),
    ("ECHO", ""),
)


def test_commands_are_written_as_redis_py_writes_them():
    assert strategy._pack(COMMANDS) == b"".join(Connection().pack_commands(COMMANDS))


# What the lock's commands answer, in both protocols, and what each must read as.
REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":1\r\n", 1),
    (b":-12\r\n", -12),
    (b"$5\r\n12345\r\n", b"12345"),
    (b"$0\r\n\r\n", b""),
    (b"$6\r\na\r\nb\x00c\r\n", b"a\r\nb\x00c"),  # a bulk string holding CRLF
    (b"$-1\r\n", None),  # RESP2 nil (SET NX that lost, a script's false)
    (b"*-1\r\n", None),  # RESP2 nil array (BLPOP that timed out)
    (b"_\r\n", None),  # RESP3 null
    (b"*2\r\n$4\r\nwake\r\n$1\r\n1\r\n", [b"wake", b"1"]),  # BLPOP that was woken
    (b"*0\r\n", []),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    (b",1.5\r\n", 1.5),
    (b"=8\r\ntxt:abcd\r\n", b"abcd"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_replies_are_read_whole_however_the_bytes_arrive(size):
    data = b"".join(raw for raw, _ in REPLIES)
    sock = Chunked(data, size)
    replies = strategy._read_replies(sock, len(REPLIES), PARSE_ERROR)
    assert replies == [value for _, value in REPLIES]
    assert sock.chunks == []


@pytest.mark.parametrize(
    ("raw", "kind", "message"),
    [
        (b"-NOSCRIPT No matching script. Please use EVAL.\r\n", NoScriptError, "No matching"),
        (b"-ERR value is not an integer\r\n", ResponseError, "not an integer"),
        (b"!21\r\nSYNTAX invalid syntax\r\n", ResponseError, "invalid syntax"),
    ],
)
def test_an_error_reply_is_returned_as_the_clients_exception_and_the_rest_still_read(
    raw, kind, message
):
    replies = strategy._read_replies(Chunked(raw + b":7\r\n", 3), 2, PARSE_ERROR)
    assert type(replies[0]) is kind
    assert message in str(replies[0])
    assert replies[1] == 7


@pytest.mark.parametrize("cut", [1, 3, 8, 13])
def test_a_connection_closed_inside_a_reply_is_a_connection_error(cut):
    data = b"*2\r\n$4\r\nwake\r\n$1\r\n1\r\n"[:cut]
    with pytest.raises(ConnectionError, match="closed by server"):
        strategy._read_replies(Chunked(data, 4), 1, PARSE_ERROR)
    with pytest.raises(ConnectionError, match="closed by server"):
        strategy._read_replies(Chunked(b"", 4), 1, PARSE_ERROR)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"?what\r\n", "unexpected reply type"),
        (b"%1\r\n+a\r\n+b\r\n", "unexpected reply type"),  # a map: no lock command sends one
        (b"$x\r\nab\r\n", "invalid literal"),
        (b":1\r\n:2\r\n", "bytes after the last reply"),  # a reply nobody asked for
    ],
)
def test_a_reply_that_is_none_of_the_protocol_is_an_invalid_response(data, message):
    with pytest.raises(InvalidResponse, match=message):
        strategy._read_replies(Chunked(data, 64), 1, PARSE_ERROR)


class Garbling:
    """A connected socket whose replies are replaced with bytes that are no reply at all."""

    def __init__(self, sock: object) -> None:
        self._sock = sock

    def recv(self, _limit: int) -> bytes:
        return b"\x16\x03\x01 this is TLS, not Redis\r\n"

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_garbage_from_the_server_is_a_lock_io_error_and_drops_the_connection(settings):
    """A server that answers with anything but Redis replies (a TLS port, a proxy's banner):
    a LockIOError naming the server and what was wrong, and the connection is not reused."""
    from tests import services

    services.require("redis")
    url = services.REDIS_URL
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": url}
    backend = CommandIsolation("garbled").backend
    assert backend._send("test", ("PING",)) == [b"PONG"]
    connection = strategy._this_thread.connections[url]
    connection._sock = Garbling(connection._sock)
    with pytest.raises(LockIOError, match="failed to test: Protocol error: unexpected reply"):
        backend._send("test", ("PING",))
    assert connection._sock is None
    assert backend._send("test", ("PING",)) == [b"PONG"]
