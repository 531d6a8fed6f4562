"""A TCP proxy between a test's client and a real server on loopback, with a hook on the bytes
each way: to record what clients send, or to break a stream at a chosen point."""

from __future__ import annotations

import socket
import threading

from tests.servers import free_port


class PipeProxy:
    """Forwards every connection to ``upstream`` (``http://host:port``); ``on_data`` sees each
    piece after it was forwarded and ends that connection by returning False."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit("//", 1)[-1].split(":")
        self.host, self.port = host, int(port)
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.url = f"http://{self.addr}"
        threading.Thread(target=self._accept, daemon=True).start()

    def on_data(self, data: bytes, up: bool, sent: int) -> bool:
        """``up``: client to server; ``sent``: bytes this direction of the connection has
        forwarded so far, ``data`` included."""
        return True

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection((self.host, self.port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if not self.on_data(data, up, sent):
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
