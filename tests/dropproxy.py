"""A TCP proxy in front of the real memcached / Redis that parses the commands going in and
the replies coming out, and once drops the client's connection either right after the server
executed a chosen command (its reply withheld: the client cannot know it ran) or right before
it (the command withheld: it never ran). BACKENDS: what each backend's commands look like."""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable

Command = tuple  # the parsed command: its words (text, RESP) or (opcode, cas, key) (binary)


# -- protocol parsers: each returns (item, bytes used) or None while incomplete ----------------
def _line(buf: bytes, at: int = 0) -> tuple[bytes, int] | None:
    end = buf.find(b"\r\n", at)
    return None if end < 0 else (buf[at:end], end + 2)


_STORAGE = {b"set", b"add", b"cas", b"replace", b"append", b"prepend"}


def text_command(buf: bytes) -> tuple[Command, int] | None:
    got = _line(buf)
    if got is None:
        return None
    line, end = got
    words = tuple(line.split())
    if words and words[0] in _STORAGE:
        end += int(words[4]) + 2
        if len(buf) < end:
            return None
    return words, end


def text_reply(buf: bytes, command: Command) -> int | None:
    if command[0] not in (b"get", b"gets"):
        got = _line(buf)
        return None if got is None else got[1]
    at = 0
    while (got := _line(buf, at)) is not None:
        line, at = got
        if line == b"END" or line.split(b" ")[0] in (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"):
            return at
        at += int(line.split()[3]) + 2  # VALUE key flags bytes [cas]: skip the data
        if len(buf) < at:
            return None
    return None


def resp_value(buf: bytes, at: int = 0) -> int | None:
    """One RESP2/RESP3 value (redis-py 8 speaks RESP3 after HELLO 3)."""
    got = _line(buf, at)
    if got is None:
        return None
    line, at = got
    kind, n = line[:1], line[1:]
    if kind in b"$!=":  # bulk string, bulk error, verbatim string
        end = at + int(n) + 2 if int(n) >= 0 else at
        return end if len(buf) >= end else None
    if kind in b"*~>%|":  # array, set, push; map and attribute hold pairs
        items = max(int(n), 0) * (2 if kind in b"%|" else 1)
        for _ in range(items):
            at = resp_value(buf, at)
            if at is None:
                return None
        if kind == b"|":  # an attribute precedes the value it describes
            return resp_value(buf, at)
    return at  # + - : _ , # ( : one line


def resp_command(buf: bytes) -> tuple[Command, int] | None:
    got = _line(buf)
    if got is None:
        return None
    line, at = got
    words = []
    for _ in range(int(line[1:])):
        got = _line(buf, at)
        if got is None:
            return None
        size, at = int(got[0][1:]), got[1]
        if len(buf) < at + size + 2:
            return None
        words.append(buf[at:at + size])
        at += size + 2
    return (words[0].upper(), *words[1:]), at


def resp_reply(buf: bytes, command: Command) -> int | None:
    return resp_value(buf)


def binary_packet(buf: bytes) -> tuple[Command, int] | None:
    if len(buf) < 24:
        return None
    end = 24 + int.from_bytes(buf[8:12], "big")
    if len(buf) < end:
        return None
    keylen, extlen = int.from_bytes(buf[2:4], "big"), buf[4]
    key = buf[24 + extlen:24 + extlen + keylen]
    return (buf[1], int.from_bytes(buf[16:24], "big"), key), end


_QUIET = {0x09, 0x0D, *range(0x11, 0x1B)}  # binary GETQ, GETKQ, SETQ ... PREPENDQ


class DropProxy:
    """Forwards to a real server; the first command matching ``trigger`` loses its connection
    ``after`` the server executed it (reply withheld) or ``before`` it reached the server.
    ``hook`` runs at that moment, while the client still waits (another writer's turn)."""

    def __init__(self, upstream: int, protocol: str, trigger: Callable[[Command], bool],
                 when: str = "after", hook: Callable[[], None] | None = None) -> None:
        self.upstream, self.trigger, self.when, self.hook = upstream, trigger, when, hook
        self.protocol = protocol
        self.fired = 0
        self.seen: list[Command] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            Connection(self, client, server).start()

    def claim_trigger(self, command: Command) -> bool:
        """True once: for the first command that matches."""
        with self._lock:
            self.seen.append(command)
            if self.fired or not self.trigger(command):
                return False
            self.fired += 1
            return True


class Connection:
    def __init__(self, proxy: DropProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.sent: deque[tuple[Command, bool]] = deque()  # commands sent, awaiting replies
        self.ready = threading.Condition()
        self.dead = False

    def start(self) -> None:
        threading.Thread(target=self._requests, daemon=True).start()
        threading.Thread(target=self._replies, daemon=True).start()

    def _drop(self) -> None:
        if self.proxy.hook is not None:
            self.proxy.hook()
        self.dead = True
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.ready:
            self.ready.notify_all()

    def _requests(self) -> None:
        parse = {"text": text_command, "resp": resp_command, "binary": binary_packet}
        split, buf, parsed = parse[self.proxy.protocol], b"", 0
        while not self.dead:
            try:
                data = self.client.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            buf += data
            at, ready, drop = parsed, 0, False
            while (got := split(buf[at:])) is not None:
                command, used = got
                hit = self.proxy.claim_trigger(command)
                if hit and self.proxy.when == "before":
                    drop = True
                    break
                with self.ready:
                    self.sent.append((command, hit))
                    self.ready.notify_all()
                at += used
                if self.proxy.protocol != "binary" or command[0] not in _QUIET:
                    ready = at
            # a quiet binary command goes with the one after it, as the client wrote them:
            # memcached answers a NOOP only seconds later when it arrives in another segment
            try:
                self.server.sendall(buf[:ready])
            except OSError:
                return
            buf, parsed = buf[ready:], at - ready
            if drop:
                self._drop()
                return

    def _replies(self) -> None:
        buf = b""
        while not self.dead:
            try:
                data = self.server.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            buf += data
            at, hit = 0, False
            while at < len(buf) and not self.dead:
                used, hit = self._one_reply(buf[at:])
                if used is None or hit:
                    break
                at += used
            try:
                self.client.sendall(buf[:at])
            except OSError:
                return
            buf = buf[at:]
            if hit:  # the server executed it: its reply never reaches the client
                self._drop()
                return

    def _one_reply(self, buf: bytes) -> tuple[int | None, bool]:
        if self.proxy.protocol == "binary":  # quiet gets have no reply: match by opcode
            got = binary_packet(buf)
            if got is None:
                return None, False
            (opcode, _, _), used = got
            with self.ready:
                hit = any(h and c[0] == opcode for c, h in self.sent)
                if hit:
                    self.sent.clear()
            return used, hit
        with self.ready:
            while not self.sent and not self.dead:  # a reply follows its command
                self.ready.wait()
            if self.dead:
                return None, False
            command, hit = self.sent[0]
        reply = text_reply if self.proxy.protocol == "text" else resp_reply
        used = reply(buf, command)
        if used is not None:
            with self.ready:
                self.sent.popleft()
        return used, hit


# -- the backends and what their commands look like on the wire -----------------------------
BACKENDS = {
    "memcached": dict(port=11211, protocol="text", url="memcached://127.0.0.1:{}",
                      cas=lambda c: c[0] == b"cas", add=lambda c: c[0] == b"add",
                      read=lambda c: c[0] == b"get"),
    "memcached+binary": dict(port=11211, protocol="binary",
                             url="memcached+binary://127.0.0.1:{}",
                             cas=lambda c: c[0] in (0x01, 0x03) and c[1] != 0,  # SET, REPLACE
                             add=lambda c: c[0] == 0x02,
                             read=lambda c: c[0] in (0x00, 0x09, 0x0C, 0x0D)),  # GET[K][Q]
    "redis": dict(port=6379, protocol="resp", url="redis://127.0.0.1:{}/15",
                  cas=lambda c: c[0] == b"EXEC",
                  add=lambda c: c[0] == b"SET" and b"NX" in {w.upper() for w in c},
                  read=lambda c: c[0] == b"MGET"),
}
