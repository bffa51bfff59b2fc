# The uplink: TLS MQTT (umqtt.simple, QoS 1) with an HTTPS fallback (urequests).
# Neither library knows about the queue: the node hands a batch to send() and removes
# it from the queue only when send() returned True (PUBACK / HTTP 200).
import json

from sense import contract as C
from sense import policy, tls

MQTT = 0
HTTP = 1


class Refused(Exception):
    # the server said no for good (401/403/422, CONNACK "not authorized"): no retry
    # helps until a human fixes the token or the config
    pass


class Uplink:
    def __init__(self, board, cfg, ca_der, on_cmd):
        self.b = board
        self.cfg = cfg
        self.on_cmd = on_cmd
        s = cfg["server"]
        self.host = s["host"]
        self.port = s.get("mqtt_port", 8883)
        self.https = s.get("https_url") or ""
        self.root = "%s/%s/%s" % (C.TOPIC_ROOT, cfg["account"], cfg["local_id"])
        tls.install(ca_der, self.host, cfg["io_timeout_s"], board.wdt_feed, board.getaddrinfo)
        self.c = None
        self.mode = MQTT
        self.fails = 0  # failed connects in a row
        self.connects = 0
        self.last_error = ""
        self.keepalive = cfg["mqtt_keepalive"]
        self.tx_at = 0  # ticks of our last packet to the broker
        self.ping_at = None  # ticks of the PINGREQ awaiting its answer
        self.ping_rx = 0
        self.http_at = 0  # ticks of the fall back to HTTPS
        self.refusal = None  # the …/err code that came while the last batch was sent

    def connected(self):
        # The HTTPS fallback is never for good: every mqtt_retry_s the node reports
        # "not connected", connect() tries MQTT first and falls back again if it fails
        if self.c is not None:
            return True
        return (
            self.mode == HTTP
            and self.b.ticks_diff(self.b.ticks_ms(), self.http_at) < self.cfg["mqtt_retry_s"] * 1000
        )

    def connect(self, info):
        # -> True when connected (MQTT, or HTTPS as the fallback)
        from umqtt.simple import MQTTClient, MQTTException

        c = MQTTClient(
            self.cfg["device_id"],
            self.host,
            self.port,
            user=self.cfg["device_id"],
            password=self.cfg["token"],
            keepalive=self.keepalive,
            ssl=True,
            ssl_params={"server_hostname": self.host},
        )
        lwt = self.root + "/" + C.SUB_LWT
        c.set_last_will(lwt, C.LWT_OFFLINE, retain=True, qos=1)
        c.set_callback(self._msg)
        try:
            self.stage = "connect"
            c.connect(clean_session=True)
            self.c = c
            self.stage = "lwt"
            c.publish(lwt, C.LWT_ONLINE.encode(), retain=True, qos=1)
            self.stage = "info"
            c.publish(self.root + "/" + C.SUB_INFO, json.dumps(info).encode(), retain=True, qos=1)
            self.stage = "subscribe"
            c.subscribe(self.root + "/" + C.SUB_CMD + "/#", qos=1)
            # the server acknowledges a payload it refuses (a 4xx is never worth a retry)
            # and says why on …/err (docs/mqtt.md); the embedded broker sends it on this
            # connection before the PUBACK, so send() knows which batch it was
            c.subscribe(self.root + "/" + C.SUB_ERR, qos=1)
        except MQTTException as e:
            self.close()
            self.last_error = "CONNACK refused %s" % e
            if e.args and e.args[0] in (4, 5):  # bad user name or password / not authorized
                # `from None`: MicroPython prints a warning for a chained cause
                raise Refused(self.last_error) from None
            return self._failed()
        except (OSError, ValueError, IndexError, AssertionError) as e:
            self.close()
            self.last_error = "mqtt %r at %s" % (e, self.stage)
            return self._failed()
        self.fails = 0
        self.mode = MQTT
        self.connects += 1
        self.tx_at = self.b.ticks_ms()
        self.ping_at = None
        return True

    def _failed(self):
        self.fails += 1
        if self.https and self.fails >= self.cfg["http_after"]:
            self.mode = HTTP  # the MQTT port may be blocked (a guest network): use HTTPS
            self.http_at = self.b.ticks_ms()
            return True
        return False

    def ping(self):
        # MQTT 3.1.1 3.1.2.10: we promised a packet at least every `keepalive` s; after
        # 1.5x that of silence the broker closes the connection and publishes our will
        # ("offline"), which is how the server learns of a power cut. PINGREQ when idle
        # for half of it; an answer (PINGRESP, read by poll()) must come within one
        # keepalive, else the link is dead (a blackholed broker): close and reconnect.
        c = self.c
        if c is None or not self.keepalive:
            return True
        b = self.b
        now = b.ticks_ms()
        if self.ping_at is not None:
            if c.sock.rx != self.ping_rx:
                self.ping_at = None  # something came back: the link is alive
            elif b.ticks_diff(now, self.ping_at) >= self.keepalive * 1000:
                self.last_error = "no PINGRESP within %d s" % self.keepalive
                self.close()
                return False
        if self.ping_at is None and b.ticks_diff(now, self.tx_at) >= self.keepalive * 500:
            try:
                c.ping()
            except (OSError, AttributeError) as e:
                self.last_error = "ping %r" % (e,)
                self.close()
                return False
            self.ping_at = self.tx_at = now
            self.ping_rx = c.sock.rx
        return True

    def _msg(self, topic, msg):
        t = topic.decode() if isinstance(topic, bytes) else topic
        cmd = self.root + "/" + C.SUB_CMD + "/"
        if t.startswith(cmd):
            self.on_cmd(t[len(cmd) :], msg)
        elif t == self.root + "/" + C.SUB_ERR:
            self.refusal = policy.err_code(msg)

    def send(self, body):
        # one batch; True once the server has it (PUBACK / 200). Raises Refused.
        # bytes, not str: umqtt counts len(msg), and "°C" is 2 bytes for 1 character
        body = body.encode() if isinstance(body, str) else body
        self.refusal = None
        if self.mode == HTTP:
            return self._post(body)
        try:
            self.c.publish(self.root, body, qos=C.MEASUREMENT_QOS)  # returns after the PUBACK
            if self.refusal == C.RETRY_CODE:
                self.refusal = None  # not acknowledged: the batch is sent again later
            self.tx_at = self.b.ticks_ms()
            return True
        except (OSError, AttributeError, IndexError, AssertionError) as e:
            self.last_error = "publish %r" % (e,)
            self.close()
            return False

    def _post(self, body):
        import urequests

        try:
            r = urequests.post(
                self.https.rstrip("/") + C.INGEST_PATH,
                data=body,
                headers={
                    "Authorization": "Bearer " + self.cfg["token"],
                    "Content-Type": "application/json",
                    C.DEVICE_HEADER: self.cfg["local_id"],
                },
            )
            st = r.status_code
            ra = r.headers.get("Retry-After") if hasattr(r, "headers") else None
            r.close()
        except (OSError, ValueError, IndexError) as e:
            self.last_error = "https %r" % (e,)
            self.mode = MQTT  # try MQTT again on the next connect
            return False
        w = policy.http_retry(st, int(ra) if ra else None)
        if w == 0:
            return True
        if w == -1:
            raise Refused("HTTP %d" % st)
        self.last_error = "HTTP %d" % st
        self.mode = MQTT
        return False

    def poll(self):
        # commands waiting on the MQTT socket (non-blocking); False if the link died
        if self.c is None:
            return True
        try:
            self.c.check_msg()
            return True
        except (OSError, IndexError, AssertionError) as e:
            self.last_error = "poll %r" % (e,)
            self.close()
            return False

    def close(self):
        c, self.c = self.c, None
        if c is not None and c.sock is not None:
            try:
                c.sock.close()  # no DISCONNECT: the broker publishes our will ("offline")
            except OSError:
                pass
