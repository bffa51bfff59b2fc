# micropython mp_tls.py <server_hostname> <port> <ca.der>: one TLS handshake through
# the firmware's socket/TLS layer (sense.tls, as umqtt and urequests use it).
# Prints "ok" or "refused <error>".
import sys

from sense import net, tls

host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(ca, "rb") as f:
    der = f.read()


def resolve(h, p):
    import socket

    return socket.getaddrinfo("127.0.0.1", p, 0, socket.SOCK_STREAM)  # any name -> here


tls.install(der, host, 5, None, resolve)
s = net.socket()
s.connect(net.getaddrinfo(host, port)[0][-1])
try:
    t = tls.wrap_socket(s, server_hostname=host)
    t.write(b"hello")
    print("ok")
except Exception as e:  # any failure of the handshake is a refusal
    print("refused", repr(e))
