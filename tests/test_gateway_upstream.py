"""The proxy's HTTP/1.1 reader for replica responses, fed real bytes over a real socket pair:
Content-Length, chunked (with extensions and trailers), interim 1xx, HEAD/204 without a body,
close-delimited bodies, keep-alive rules; and the request writer drops smuggled header lines."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from emnist.gateway.proxy import UpstreamError, _Conn, _request, _response


@pytest.fixture()
def pair() -> Iterator[tuple[_Conn, socket.socket]]:
    ours, theirs = socket.socketpair()
    conn = _Conn.__new__(_Conn)
    conn.sock, conn.buf = ours, bytearray()
    ours.settimeout(5)
    yield conn, theirs
    ours.close()
    theirs.close()


def feed(sock: socket.socket, data: bytes, close: bool = False) -> None:
    def send() -> None:
        for i in range(0, len(data), 7):  # in small pieces: the reader must reassemble
            sock.sendall(data[i:i + 7])
        if close:
            sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    t.join(5)


def test_content_length_body_and_keep_alive(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    feed(peer, b"HTTP/1.1 201 CREATED\r\nContent-Length: 5\r\nX-A: 1\r\nbogus line\r\n\r\n"
               b"helloHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert _response(conn, "POST") == (201, [("Content-Length", "5"), ("X-A", "1")],
                                       b"hello", True)
    assert _response(conn, "GET")[::2] == (200, b"")  # the next response on the same socket


def test_chunked_with_extensions_and_trailers(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    feed(peer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")
    status, _, body, keep = _response(conn, "GET")
    assert (status, body, keep) == (200, b"abc0123456789", True)
    assert conn.buf == b""


def test_interim_answers_are_skipped(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    feed(peer, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
    assert _response(conn, "POST")[::2] == (202, b"ok")


@pytest.mark.parametrize("method, status", [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_no_body_answers(pair: tuple[_Conn, socket.socket], method: str, status: int) -> None:
    conn, peer = pair
    feed(peer, f"HTTP/1.1 {status} X\r\nContent-Length: 9\r\n\r\n".encode())
    assert _response(conn, method)[::2] == (status, b"")


@pytest.mark.parametrize("head, keep", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", False),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", True),
])
def test_keep_alive_rules(pair: tuple[_Conn, socket.socket], head: bytes, keep: bool) -> None:
    conn, peer = pair
    feed(peer, head)
    assert _response(conn, "GET")[3] is keep


def test_a_body_without_length_ends_with_the_connection(pair: tuple[_Conn, socket.socket]
                                                        ) -> None:
    conn, peer = pair
    feed(peer, b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True)
    assert _response(conn, "GET")[2:] == (b"all of it", False)


@pytest.mark.parametrize("data", [b"garbage\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_malformed_answers_are_upstream_errors(pair: tuple[_Conn, socket.socket],
                                               data: bytes) -> None:
    conn, peer = pair
    feed(peer, data, close=True)
    with pytest.raises((UpstreamError, ValueError)):
        _response(conn, "GET")


def test_a_closed_connection_is_an_os_error(pair: tuple[_Conn, socket.socket]) -> None:
    conn, peer = pair
    feed(peer, b"HTTP/1.1 200 OK\r\nContent-Len", close=True)
    with pytest.raises(ConnectionResetError):
        _response(conn, "GET")


def test_requests_cannot_smuggle_header_lines() -> None:
    data = _request("POST", "/x?y=1", 5000, [("X-Ok", "1"), ("X-Bad", "a\r\nHost: evil"),
                                             ("X-Nul", "a\x00b")], b"body")
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b"body"
    assert head.split(b"\r\n") == [b"POST /x?y=1 HTTP/1.1", b"Host: 127.0.0.1:5000",
                                   b"X-Ok: 1", b"Content-Length: 4"]
