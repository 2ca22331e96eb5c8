"""Who is listening: the uid that owns the server end of a loopback TCP connection.

relay's listener port is unprivileged, so while relay is down any local user can bind it
and collect what `relay sendmail` hands over (its AUTH password, the mail). On Linux the
kernel lists every TCP socket with its owner's uid in /proc/net/tcp and /proc/net/tcp6;
the server end of a connection (accepted or still in the backlog) carries the uid of the
listening socket it came from. sendmail matches its own connection there before it sends
a byte. Pure parsing (``socket_uid``) apart from reading the two files (``peer_uid``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_ESTABLISHED, _SYN_RECV = "01", "03"  # /proc's hex states of the server end


def _address(field: str) -> tuple[str, int]:
    """``0100007F:66DB`` -> ('127.0.0.1', 26331): the address is 32-bit words in host
    byte order, the port big-endian hex."""
    hex_ip, _, hex_port = field.partition(":")
    raw = bytes.fromhex(hex_ip)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    packed = b"".join(struct.pack("!I", w) for w in words)
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(hex_port, 16)


def _normal(address: tuple[str, int]) -> tuple[str, int]:
    ip = ipaddress.ip_address(address[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), address[1]


def socket_uid(lines: Iterable[str], server: tuple[str, int], client: tuple[str, int]
               ) -> int | None:
    """The uid of the socket at ``server`` connected to ``client`` in the lines of a
    /proc/net/tcp{,6} table; None if it is not there (another host, another namespace)."""
    server, client = _normal(server), _normal(client)
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[0] == "sl" or fields[3] not in (_ESTABLISHED, _SYN_RECV):
            continue
        try:
            if _address(fields[1]) == server and _address(fields[2]) == client:
                return int(fields[7])
        except ValueError:
            continue
    return None


def peer_uid(sock: socket.socket) -> int | None:
    """The uid that owns the other end of the connected ``sock``, if this machine's
    kernel says (Linux, the same network namespace); else None."""
    server, client = sock.getpeername()[:2], sock.getsockname()[:2]
    for table in PROC_TABLES:
        try:
            with open(table, encoding="ascii") as lines:
                uid = socket_uid(lines, server, client)
        except OSError:
            continue
        if uid is not None:
            return uid
    return None
