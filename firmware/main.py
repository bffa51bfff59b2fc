# Runs at every boot (ESP32: after boot.py; unix port: micropython main.py).
# The hardware is chosen in hw/__init__.py; everything else is in sense/.
import sys

# The pinned umqtt.simple / urequests are in /lib; a MicroPython build may freeze its
# own copies, and sys.path searches '.frozen' before '/lib'. /lib goes first.
if "/lib" in sys.path:
    sys.path.remove("/lib")
    sys.path.insert(0, "/lib")

import sense.node

sense.node.main()
