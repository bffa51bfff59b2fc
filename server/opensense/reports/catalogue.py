"""Every string a report prints, by language: one catalogue (issue 18 item 7).

A dict catalogue rather than gettext .po/.mo files: the strings are few, they ship
inside the package with no compile step, and `tests/test_reports.py` checks that
each language has exactly the English keys. English is complete; German is the
second language, to prove the catalogue works. A template asks `t(lang, key, **kw)`
and never holds a literal of its own.
"""

from __future__ import annotations

from typing import Any

LANGUAGES = ("en", "de")

EN: dict[str, str] = {
    "title": "HACCP monthly temperature report",
    "site": "Site",
    "address": "Address",
    "period": "Period",
    "period_value": "{start} – {end} ({hours} h, time zone {tz})",
    "channels": "Channels",
    "readings": "Readings",
    "excursions": "Excursions",
    "no_data_period": "No readings were recorded at this site in this period.",
    "signatures": "Signatures",
    "sign_intro": "Reviewed and found complete:",
    "printed_name": "Printed name",
    "role": "Role",
    "date": "Date",
    "signature": "Signature",
    "channel_heading": "{name}",
    "channel_meta": "Device {device} · unit {unit} · cadence {cadence} s · limits {limits}",
    "no_limits": "none",
    "summary": "Period: min {vmin}, mean {vmean}, max {vmax} {unit}; {in_range} h of {hours} h in range; data coverage {uptime} %",
    "mkt": "Mean kinetic temperature {mkt} °C (ΔH = {dh} kJ/mol, R = 8.314 J/mol/K, n = {n} readings; T_k = (ΔH/R) / −ln(Σ exp(−ΔH/(R·T_i)) / n))",
    "no_data_channel": "No readings from this channel in this period.",
    "chart_caption": "Hourly minimum and maximum; dashed lines: limits",
    "day": "Day",
    "hours": "Hours",
    "n": "Readings",
    "min": "Min",
    "mean": "Mean",
    "max": "Max",
    "in_range": "Hours in range",
    "excursion_log": "Excursion log",
    "no_excursions": "No excursions in this period.",
    "channel": "Channel",
    "opened": "Opened",
    "closed": "Closed",
    "duration": "Duration",
    "peak": "Peak",
    "ack": "Acknowledgement and corrective action",
    "still_open": "open at period end",
    "ack_by": "Acknowledged by {who} at {when}",
    "not_acked": "Not acknowledged",
    "cause": "Cause",
    "action": "Action",
    "product": "Product",
    "note": "Note",
    "cleared_by": "Cleared by {who}",
    "health": "Sensor health",
    "uptime": "Data coverage",
    "gaps": "Gaps",
    "gap_rule": "A gap is a silence longer than two cadences, the period's edges included.",
    "gap_from": "From",
    "gap_to": "To",
    "no_gaps": "No gaps in this period.",
    "more_gaps": "… and {n} more gaps",
    "thresholds": "Threshold changes",
    "no_threshold_changes": "No threshold changes in this period.",
    "at": "At",
    "new_limits": "New limits",
    "by": "By",
    "verify": "How to check this report",
    "verify_body": (
        "This report cannot be verified yet. A later version of OpenSense will record a "
        "checksum of each rendered report in the site's tamper-evident audit trail and "
        "print here, with a short link and QR code, how to confirm that this document is "
        "the one the system produced. This page carries no checksum and no link: until it "
        "does, ask the operator of this OpenSense installation to render the same period "
        "again; the same readings always give the same document."
    ),
    "verify_originals": (
        "Original readings are never edited: corrections and annotations appear as notes."
    ),
    "footer": "{site} · {period} · page {page}",
    "unit_h": "h",
    "unit_min": "min",
    "dash": "—",
    "notes_col": "Notes",
    "note_threshold": "{when}: limits changed to {limits} by {who}",
    "note_offset": "{when}: calibration offset set to {offset}",
    "note_excursion": "{when}: excursion noted: {note}",
    "zooms": "Excursions in detail",
    "zoom_caption": "{channel}: {opened} – {closed}, peak {peak} {unit} (shaded: the excursion; an hour either side)",
    "more_zooms": "… and {n} more excursions (in the log above)",
    "calibration": "Calibration record",
    "calibration_intro": "Calibration offsets of each channel: the one in force at the period's start and every change in the period. Readings are stored as corrected at the time; originals are never edited.",
    "no_calibration": "No calibration offsets recorded for these channels.",
    "since": "Effective from",
    "offset": "Offset",
    "in_force": "Status",
    "at_start": "in force at period start",
    "changed_in_period": "changed in period",
    "annual_title": "HACCP annual temperature report",
    "annual_intro": "Per channel and month, from hourly rollups: hours with data count hours with at least one reading; hours in range count hours whose minimum and maximum both lay within the limits in force; excursions overlapping the month and their duration within it.",
    "annual_meta": "Device {device} · unit {unit}",
    "month": "Month",
    "hours_data": "Hours with data",
    "total": "Total",
    "uptime_title": "Server room uptime report",
    "site_availability": "Availability",
    "devices": "Devices",
    "uptime_rule": "A device is available while its best-covered channel has data (a reading stands until the next, for at most two cadences); the site's availability is the mean of its devices'. Outages: device offline events.",
    "device": "Device",
    "availability": "Availability",
    "outages": "Outages",
    "longest_gap": "Longest gap",
    "hours_above": "Hours above limit",
    "hours_below": "Hours below limit",
}

DE: dict[str, str] = {
    "title": "HACCP-Monatsbericht Temperatur",
    "site": "Standort",
    "address": "Anschrift",
    "period": "Zeitraum",
    "period_value": "{start} – {end} ({hours} h, Zeitzone {tz})",
    "channels": "Kanäle",
    "readings": "Messwerte",
    "excursions": "Abweichungen",
    "no_data_period": "An diesem Standort wurden in diesem Zeitraum keine Messwerte aufgezeichnet.",
    "signatures": "Unterschriften",
    "sign_intro": "Geprüft und für vollständig befunden:",
    "printed_name": "Name in Druckschrift",
    "role": "Funktion",
    "date": "Datum",
    "signature": "Unterschrift",
    "channel_heading": "{name}",
    "channel_meta": "Gerät {device} · Einheit {unit} · Messintervall {cadence} s · Grenzwerte {limits}",
    "no_limits": "keine",
    "summary": "Zeitraum: Min. {vmin}, Mittel {vmean}, Max. {vmax} {unit}; {in_range} h von {hours} h im Sollbereich; Datenabdeckung {uptime} %",
    "mkt": "Mittlere kinetische Temperatur {mkt} °C (ΔH = {dh} kJ/mol, R = 8,314 J/mol/K, n = {n} Messwerte; T_k = (ΔH/R) / −ln(Σ exp(−ΔH/(R·T_i)) / n))",
    "no_data_channel": "Keine Messwerte dieses Kanals in diesem Zeitraum.",
    "chart_caption": "Stündliches Minimum und Maximum; gestrichelt: Grenzwerte",
    "day": "Tag",
    "hours": "Stunden",
    "n": "Messwerte",
    "min": "Min.",
    "mean": "Mittel",
    "max": "Max.",
    "in_range": "Stunden im Sollbereich",
    "excursion_log": "Abweichungsprotokoll",
    "no_excursions": "Keine Abweichungen in diesem Zeitraum.",
    "channel": "Kanal",
    "opened": "Beginn",
    "closed": "Ende",
    "duration": "Dauer",
    "peak": "Spitzenwert",
    "ack": "Quittierung und Korrekturmaßnahme",
    "still_open": "bei Zeitraumende offen",
    "ack_by": "Quittiert von {who} am {when}",
    "not_acked": "Nicht quittiert",
    "cause": "Ursache",
    "action": "Maßnahme",
    "product": "Ware",
    "note": "Notiz",
    "cleared_by": "Beendet von {who}",
    "health": "Sensorzustand",
    "uptime": "Datenabdeckung",
    "gaps": "Lücken",
    "gap_rule": "Eine Lücke ist eine Stille von mehr als zwei Messintervallen, die Ränder des Zeitraums eingeschlossen.",
    "gap_from": "Von",
    "gap_to": "Bis",
    "no_gaps": "Keine Lücken in diesem Zeitraum.",
    "more_gaps": "… und {n} weitere Lücken",
    "thresholds": "Änderungen der Grenzwerte",
    "no_threshold_changes": "Keine Änderungen der Grenzwerte in diesem Zeitraum.",
    "at": "Zeitpunkt",
    "new_limits": "Neue Grenzwerte",
    "by": "Durch",
    "verify": "So prüfen Sie diesen Bericht",
    "verify_body": (
        "Dieser Bericht kann noch nicht geprüft werden. Eine spätere Version von OpenSense "
        "wird eine Prüfsumme jedes erzeugten Berichts im manipulationssicheren Prüfpfad des "
        "Standorts festhalten und hier, mit Kurzlink und QR-Code, erklären, wie Sie "
        "bestätigen, dass dieses Dokument das vom System erzeugte ist. Diese Seite trägt "
        "keine Prüfsumme und keinen Link: Bis dahin bitten Sie den Betreiber dieser "
        "OpenSense-Installation, denselben Zeitraum erneut zu erzeugen; dieselben Messwerte "
        "ergeben stets dasselbe Dokument."
    ),
    "verify_originals": (
        "Originale Messwerte werden nie verändert: Korrekturen und Anmerkungen erscheinen als Notizen."
    ),
    "footer": "{site} · {period} · Seite {page}",
    "unit_h": "h",
    "unit_min": "min",
    "dash": "—",
    "notes_col": "Notizen",
    "note_threshold": "{when}: Grenzwerte geändert auf {limits} durch {who}",
    "note_offset": "{when}: Kalibrierkorrektur gesetzt auf {offset}",
    "note_excursion": "{when}: Abweichung vermerkt: {note}",
    "zooms": "Abweichungen im Detail",
    "zoom_caption": "{channel}: {opened} – {closed}, Spitzenwert {peak} {unit} (schattiert: die Abweichung; je eine Stunde davor und danach)",
    "more_zooms": "… und {n} weitere Abweichungen (im Protokoll oben)",
    "calibration": "Kalibrierprotokoll",
    "calibration_intro": "Kalibrierkorrekturen jedes Kanals: die zu Beginn des Zeitraums gültige und jede Änderung im Zeitraum. Messwerte werden so gespeichert, wie sie damals korrigiert wurden; Originale werden nie verändert.",
    "no_calibration": "Für diese Kanäle sind keine Kalibrierkorrekturen erfasst.",
    "since": "Gültig ab",
    "offset": "Korrektur",
    "in_force": "Status",
    "at_start": "gültig zu Beginn des Zeitraums",
    "changed_in_period": "im Zeitraum geändert",
    "annual_title": "HACCP-Jahresbericht Temperatur",
    "annual_intro": "Je Kanal und Monat, aus Stundenwerten: Stunden mit Daten zählen Stunden mit mindestens einem Messwert; Stunden im Sollbereich zählen Stunden, deren Minimum und Maximum beide innerhalb der gültigen Grenzwerte lagen; Abweichungen, die den Monat berühren, und ihre Dauer darin.",
    "annual_meta": "Gerät {device} · Einheit {unit}",
    "month": "Monat",
    "hours_data": "Stunden mit Daten",
    "total": "Gesamt",
    "uptime_title": "Verfügbarkeitsbericht Serverraum",
    "site_availability": "Verfügbarkeit",
    "devices": "Geräte",
    "uptime_rule": "Ein Gerät ist verfügbar, solange sein am besten abgedeckter Kanal Daten hat (ein Messwert gilt bis zum nächsten, höchstens zwei Messintervalle); die Verfügbarkeit des Standorts ist der Mittelwert seiner Geräte. Ausfälle: Ereignisse „Gerät offline“.",
    "device": "Gerät",
    "availability": "Verfügbarkeit",
    "outages": "Ausfälle",
    "longest_gap": "Längste Lücke",
    "hours_above": "Stunden über Grenzwert",
    "hours_below": "Stunden unter Grenzwert",
}

CATALOGUE: dict[str, dict[str, str]] = {"en": EN, "de": DE}
DECIMAL = {"en": ".", "de": ","}


def t(lang: str, key: str, **kw: Any) -> str:
    text = CATALOGUE[lang][key]
    return text.format(**kw) if kw else text


def num(lang: str, v: float | None, digits: int = 1) -> str:
    """A number as the language writes it (German: decimal comma)."""
    if v is None:
        return CATALOGUE[lang]["dash"]
    s = f"{v:,.{digits}f}"
    if DECIMAL[lang] == ",":
        s = s.replace(",", "\x00").replace(".", ",").replace("\x00", ".")
    return s
