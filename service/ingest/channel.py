"""The line between the service and its listener processes: one message per datagram, descriptors beside.

Why a ``SOCK_SEQPACKET`` socket pair: its messages keep their boundaries (no framing to write or get wrong),
each ``sendmsg`` is atomic (several threads of one side may send at once) and connected sockets can travel
with a message (``SCM_RIGHTS``, unix(7)), which is how an accepted TCP connection reaches the process that
serves it (:mod:`service.ingest.processes`). Messages are small tuples pickled: both ends are our own
process and a child it started, over a socket pair nobody else holds, so nothing untrusted is unpickled.
"""

from __future__ import annotations

import array
import pickle
import socket
from typing import Any

__all__ = ["Channel", "MAX_MESSAGE"]

MAX_MESSAGE = 1 << 16
"""The largest message: an instance's attributes, a verdict, a pickled error need a few KiB. Read into a
buffer the channel keeps: ``recv(1 MiB)`` allocated (and mapped, and unmapped) a mebibyte per message, most
of the reading side's CPU per instance."""
_MAX_FDS = 4
_FD_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


class Channel:
    """One end of the pair: :meth:`send` from any thread, :meth:`recv` (or :meth:`recv_message`) from one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray(MAX_MESSAGE)
        self._view = memoryview(self._buffer)

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def send(self, message: tuple[Any, ...], fds: tuple[int, ...] = ()) -> None:
        """Send one message (and the descriptors, duplicated into the receiver); OSError once the other
        end is gone (EPIPE, ECONNRESET), ValueError for a message above :data:`MAX_MESSAGE`."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"a {len(data)}-byte message on the listener channel")
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def recv_message(self) -> tuple[Any, ...] | None:
        """The next message, where none carries descriptors (what the service reads: one ``recv`` and
        no control buffer, on every C-STORE's path); None at the end."""
        try:
            n = self.sock.recv_into(self._buffer)
        except OSError:
            return None
        if not n:
            return None
        return pickle.loads(self._view[:n])  # type: ignore[no-any-return]  # noqa: S301 (as in recv)

    def recv(self) -> tuple[tuple[Any, ...], list[int]] | None:
        """The next message and the descriptors that came with it (the caller owns them); None at the end
        (the other side closed, or exited)."""
        try:
            n, ancillary, _flags, _addr = self.sock.recvmsg_into([self._buffer], _FD_SPACE)
        except OSError:
            return None
        if not n:
            return None
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        return pickle.loads(self._view[:n]), list(fds)  # noqa: S301 (our own child, over a private socket pair)

    def close(self) -> None:
        self.sock.close()
