# The socket and TLS layer the pinned libraries use. umqtt.simple 1.3.4 and urequests
# 0.9.1 import `usocket` and `ussl` by name; install() maps those names to this module
# and sense.net, so the unchanged pinned files get:
#   - certificate verification always on: CERT_REQUIRED, the broker's CA as DER bytes,
#     server_hostname checked (MicroPython's ssl verifies nothing by default)
#   - a timeout on every socket, kept even when umqtt calls setblocking(True)
#     (umqtt's wait_msg does after every check_msg: without this a broker that stops
#     answering would block forever and the watchdog would reset the chip)
#   - the watchdog fed at every read and write, so long TLS handshakes and slow links
#     never starve it
#   - DNS resolved again at every connect (through the board, which the sim can steer)
import ssl
import sys

from sense import net
from sense.sock import CFG, Sock, feed

_ctx = []


def install(ca_der, host, timeout_s, feed, resolve):
    CFG.update(ca=ca_der, host=host, timeout=timeout_s, feed=feed, resolve=resolve)
    _ctx.clear()
    sys.modules["ussl"] = sys.modules["sense.tls"]
    sys.modules["usocket"] = net


def context():
    # one context for the life of the program: the CA is parsed once (memory habit)
    if not _ctx:
        if not CFG["ca"]:
            raise ValueError("no CA: refusing an unverified TLS connection")
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.verify_mode = ssl.CERT_REQUIRED
        c.load_verify_locations(cadata=CFG["ca"])
        _ctx.append(c)
    return _ctx[0]


def wrap_socket(sock, server_hostname=None, **_kw):
    # every argument but the host name is ignored on purpose: verification stays on
    raw = sock.raw if isinstance(sock, Sock) else sock
    feed()
    s = context().wrap_socket(raw, server_hostname=server_hostname or CFG["host"])
    feed()
    return Sock(s, raw)
