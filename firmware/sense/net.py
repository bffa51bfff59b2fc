# `usocket` as the pinned libraries see it (see sense/tls.py): sockets with a timeout,
# names resolved through the board at every connect.
import socket as _s

from sense import tls

AF_INET = _s.AF_INET
SOCK_STREAM = _s.SOCK_STREAM


def getaddrinfo(host, port, *_a):
    r = tls.CFG["resolve"]
    return r(host, port) if r else _s.getaddrinfo(host, port, 0, SOCK_STREAM)


def socket(af=AF_INET, typ=SOCK_STREAM, proto=0):
    s = _s.socket(af, typ, proto)
    s.settimeout(tls.CFG["timeout"])
    return tls.Sock(s, s)
