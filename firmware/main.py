# Runs at every boot (ESP32: after boot.py; unix port: micropython main.py).
# The hardware is chosen in hw/__init__.py; everything else is in sense/.
import sense.node

sense.node.main()
