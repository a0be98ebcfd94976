"""A loopback TCP proxy that breaks connections on purpose, for fault-injection tests.

    with FaultProxy(("127.0.0.1", sshd.port), drop_every=2 << 20) as proxy:
        device = sshd.device(port=proxy.port, known_hosts=str(proxy_known_hosts))
        ...                                   # every connection is cut after 2 MiB (both directions)
    assert proxy.drops >= 5

Each accepted connection is forwarded to `target` byte for byte. Counting the bytes of that connection
in both directions: `drop_every=N` cuts it once N bytes have passed (mid-packet, as a flaky radio link
would): both ends get EOF after the bytes already forwarded (reset=True: a TCP RST instead, which also
throws away what the peers had not read yet); `flip_every=N` XORs one byte with 0xFF at byte N instead
(a corrupted segment, which SSH's MAC then rejects). `bytes_per_s` paces each connection like a real
link: on an unpaced loopback, megabytes sit in the receiver's buffers when the cut comes and are lost
with it, far more than on a real link, where the endpoints keep up with the wire. `max_faults` caps the faults over the proxy's life; after that
it only forwards. The counts restart with every new connection, so a reconnect's handshake gets through.
Stdlib only; one thread per connection; everything stops on exit.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from types import TracebackType

_BLOCK = 64 * 1024


class FaultProxy:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        drop_every: int | None = None,
        flip_every: int | None = None,
        max_faults: int | None = None,
        reset: bool = False,
        bytes_per_s: float | None = None,
    ):
        if drop_every is not None and flip_every is not None:
            raise ValueError("choose drop_every or flip_every, not both")
        self.target = target
        self.drop_every = drop_every
        self.flip_every = flip_every
        self.max_faults = max_faults
        self.reset = reset
        self.bytes_per_s = bytes_per_s
        self.connections = 0  # accepted so far
        self.drops = 0  # connections cut by drop_every
        self.flips = 0  # bytes flipped by flip_every
        self.bytes_forwarded = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FaultProxy:
        accept = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                _close(s)
        for t in self._threads:
            t.join(timeout=5)

    # -------------------------------------------------------------------------------- forwarding
    def _fault_allowed(self) -> bool:
        with self._lock:
            return self.max_faults is None or self.drops + self.flips < self.max_faults

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self.connections += 1
                self._sockets.update((client, server))
            t = threading.Thread(target=self._pump, args=(client, server), name="faultproxy-pump", daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        seen = 0  # bytes of this connection, both directions
        dropped = False
        sel = selectors.DefaultSelector()
        for s in (client, server):
            s.setblocking(True)
            s.settimeout(None)
            sel.register(s, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(_BLOCK)
                    if not data:
                        return
                    if self.drop_every is not None and seen + len(data) >= self.drop_every and self._fault_allowed():
                        peer[src].sendall(data[: self.drop_every - seen])
                        with self._lock:
                            self.drops += 1
                            self.bytes_forwarded += self.drop_every - seen
                        dropped = True
                        return  # the finally cuts both sides
                    if self.flip_every is not None and seen < self.flip_every <= seen + len(data) and self._fault_allowed():
                        i = self.flip_every - seen - 1
                        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                        with self._lock:
                            self.flips += 1
                        seen += len(data) - self.flip_every  # the next flip comes flip_every bytes later
                    else:
                        seen += len(data)
                    peer[src].sendall(data)
                    with self._lock:
                        self.bytes_forwarded += len(data)
                    if self.bytes_per_s:  # no bursts: idle time earns no credit
                        time.sleep(len(data) / self.bytes_per_s)
        except OSError:
            return
        finally:
            sel.close()
            if dropped and not self.reset:
                _finish(client, server)
            for s in (client, server):
                _close(s, reset=self.reset and dropped)
                with self._lock:
                    self._sockets.discard(s)


def _finish(*socks: socket.socket) -> None:
    """End both sides with FIN, after the bytes already forwarded; read (and drop) what the peers still
    send until they close, so that close() does not turn into an RST that discards data in flight."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2.0)
        except OSError:
            pass
    for s in socks:
        try:
            while s.recv(_BLOCK):
                pass
        except OSError:
            pass


def _close(s: socket.socket, *, reset: bool = False) -> None:
    if reset:  # linger 0: close() sends an RST
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    else:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    s.close()
