# What sense.tls (`ussl`) and sense.net (`usocket`) share: the settings tls.install
# sets, the watchdog feed, and the socket wrapper both hand out. Its own module so
# that neither of the two imports the other's module for it.

CFG = {"ca": None, "host": None, "timeout": 10, "feed": None, "resolve": None}


def feed():
    f = CFG["feed"]
    if f:
        f()


class Sock:
    # a socket (plain or TLS) whose blocking mode always keeps the timeout
    def __init__(self, s, raw):
        self.s = s
        self.raw = raw
        self.rx = 0  # reads that returned data: the uplink's keepalive sees a PINGRESP by it

    def connect(self, addr):
        feed()
        self.s.connect(addr)

    def read(self, n=None):
        feed()
        d = self.s.read() if n is None else self.s.read(n)
        if d:
            self.rx += 1
        return d

    def readinto(self, buf, n=None):
        feed()
        return self.s.readinto(buf) if n is None else self.s.readinto(buf, n)

    def readline(self):
        feed()
        return self.s.readline()

    def write(self, buf, n=None):
        feed()
        return self.s.write(buf) if n is None else self.s.write(buf, n)

    def setblocking(self, flag):
        self.s.setblocking(flag)
        if flag:
            self.raw.settimeout(CFG["timeout"])

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass
