# `usocket` as the pinned libraries see it (see sense/tls.py): sockets with a timeout
# (the wrapper in sense/sock.py), names resolved through the board at every connect.
import socket as _s

from sense import sock

AF_INET = _s.AF_INET
SOCK_STREAM = _s.SOCK_STREAM


def getaddrinfo(host, port, *_a):
    r = sock.CFG["resolve"]
    return r(host, port) if r else _s.getaddrinfo(host, port, 0, SOCK_STREAM)


def socket(af=AF_INET, typ=SOCK_STREAM, proto=0):
    s = _s.socket(af, typ, proto)
    s.settimeout(sock.CFG["timeout"])
    return sock.Sock(s, s)
