"""Measurement kinds, declared once as data.

Each kind lists the units a device may report (the first is the default) with the
physical range a real value can take in that unit. A value outside that range is
refused at ingest (422 out_of_range): it is a broken probe or a broken payload, not
a reading. Units are stored as reported and never converted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    symbol: str
    min: float
    max: float
    integral: bool = False  # leak: only 0 or 1


@dataclass(frozen=True)
class Kind:
    name: str
    units: tuple[Unit, ...]
    auxiliary: bool  # shown, not alarmed by default
    doc: str

    @property
    def default_unit(self) -> str:
        return self.units[0].symbol

    def unit(self, symbol: str) -> Unit | None:
        for u in self.units:
            if u.symbol == symbol:
                return u
        return None


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "temperature",
            (Unit("°C", -100.0, 400.0),),
            False,
            "Air or product temperature; DS18B20 probes cover −55..+125 °C.",
        ),
        Kind("humidity", (Unit("%", 0.0, 100.0),), False, "Relative humidity."),
        Kind("pressure", (Unit("hPa", 0.0, 2000.0),), False, "Absolute air pressure."),
        Kind("co2", (Unit("ppm", 0.0, 100000.0),), False, "Carbon dioxide concentration."),
        Kind("voltage", (Unit("V", -1000.0, 1000.0),), False, "Mains or supply voltage."),
        Kind("current", (Unit("A", -1000.0, 1000.0),), False, "Current draw."),
        Kind("power", (Unit("W", -1.0e6, 1.0e6),), False, "Power draw."),
        Kind(
            "leak",
            (Unit("0/1", 0.0, 1.0, integral=True),),
            False,
            "Water leak contact: 1 wet, 0 dry.",
        ),
        Kind(
            "battery",
            (Unit("%", 0.0, 100.0), Unit("V", 0.0, 60.0)),
            True,
            "Battery level in %, or cell voltage with unit V.",
        ),
        Kind("signal", (Unit("dBm", -150.0, 30.0),), True, "Radio signal strength (RSSI)."),
        Kind("snr", (Unit("dB", -40.0, 40.0),), True, "Radio signal-to-noise ratio (LoRaWAN)."),
        Kind(
            "health",
            (Unit("1", 0.0, 1.0e12), Unit("s", 0.0, 1.0e12), Unit("B", 0.0, 1.0e12)),
            True,
            "A node's own health figure, named by its label (uptime s, heap_free B, "
            "queue_depth, drops, ...; docs/firmware.md).",
        ),
    )
}
