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
        "This is a draft: it was rendered without a seal, its checksum is not in the "
        "audit trail, and it cannot be verified yet. For a report an inspector can check, "
        "render it sealed (opensense report render without --draft, or the API)."
    ),
    "draft_mark": "DRAFT",
    "draft_footer": "DRAFT · not sealed, cannot be verified",
    "draft_cover": "DRAFT: not sealed, not for inspection.",
    "seal_heading": "Verification",
    "seal_intro": (
        "This report is sealed: its SHA-256 checksum is in the site's tamper-evident audit "
        "trail. The last page says how to check it."
    ),
    "seal_rendered": "Rendered at",
    "seal_origin": "Audit log",
    "seal_size": "Tree size",
    "seal_root": "Root hash",
    "seal_link": "Verify at",
    "seal_footer": "verify: {link}",
    "verify_sealed": (
        "When this report was rendered, its SHA-256 checksum (a fingerprint of the file's "
        "bytes) was written to the site's tamper-evident audit trail, and a signed "
        "checkpoint of that trail was taken. The checkpoint is printed below and on the cover."
    ),
    "verify_how": "How to check",
    "verify_step_link": (
        "1. Scan the QR code below, or type the link {link} into a browser. On that page, "
        "upload this PDF file: the server computes its checksum and compares it."
    ),
    "verify_step_hash": (
        "2. Or compute the checksum yourself and enter it there: on Linux sha256sum "
        "report.pdf, on macOS shasum -a 256 report.pdf, on Windows certutil -hashfile "
        "report.pdf SHA256. The result is 64 characters, 0-9 and a-f."
    ),
    "verify_proves_heading": "What a match proves",
    "verify_proves": (
        "The page then confirms the site ({site}), the period ({period}) and the time of "
        "rendering ({when}), and nothing else. A match proves that this file is, byte for "
        "byte, the report this system rendered then: no reading, note or page was changed "
        "since. Any change, even of one reading, gives a different checksum, which the "
        "page refuses."
    ),
    "verify_not_heading": "What it does not prove",
    "verify_not": (
        "It does not prove that the readings were right (a sensor can be wrong, misplaced or "
        "out of calibration), that nothing happened that the sensors did not measure, or who "
        "printed or signed a paper copy. A paper copy has no checksum: check the file it was "
        "printed from. A checksum the page does not know means the file was changed or is not "
        "a report of this system: ask the operator to render it again."
    ),
    "verify_checkpoint": "The audit trail's signed checkpoint at rendering",
    "verify_checkpoint_body": (
        "Origin, tree size and root hash of the account's audit trail when the report was "
        "rendered, signed by the operator's key (C2SP signed note, Ed25519). An auditor "
        "holding the operator's verifier key can check the signature and that later "
        "checkpoints extend this one (docs/audit.md)."
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
        "Dies ist ein Entwurf: Er wurde ohne Siegel erzeugt, seine Prüfsumme steht nicht im "
        "Prüfpfad, und er kann noch nicht geprüft werden. Für einen Bericht, den eine "
        "Prüferin oder ein Prüfer kontrollieren kann, erzeugen Sie ihn versiegelt "
        "(opensense report render ohne --draft, oder über die API)."
    ),
    "draft_mark": "ENTWURF",
    "draft_footer": "ENTWURF · nicht versiegelt, nicht prüfbar",
    "draft_cover": "ENTWURF: nicht versiegelt, nicht zur Vorlage bei Kontrollen.",
    "seal_heading": "Prüfung",
    "seal_intro": (
        "Dieser Bericht ist versiegelt: Seine SHA-256-Prüfsumme steht im manipulationssicheren "
        "Prüfpfad des Standorts. Die letzte Seite erklärt, wie Sie ihn prüfen."
    ),
    "seal_rendered": "Erzeugt am",
    "seal_origin": "Prüfpfad",
    "seal_size": "Baumgröße",
    "seal_root": "Wurzel-Hash",
    "seal_link": "Prüfen unter",
    "seal_footer": "prüfen: {link}",
    "verify_sealed": (
        "Als dieser Bericht erzeugt wurde, wurde seine SHA-256-Prüfsumme (ein Fingerabdruck "
        "der Bytes der Datei) in den manipulationssicheren Prüfpfad des Standorts geschrieben "
        "und ein signierter Checkpoint dieses Prüfpfads genommen. Der Checkpoint steht unten "
        "und auf dem Deckblatt."
    ),
    "verify_how": "So prüfen Sie",
    "verify_step_link": (
        "1. Scannen Sie den QR-Code unten oder geben Sie den Link {link} im Browser ein. "
        "Laden Sie dort diese PDF-Datei hoch: Der Server berechnet ihre Prüfsumme und "
        "vergleicht sie."
    ),
    "verify_step_hash": (
        "2. Oder berechnen Sie die Prüfsumme selbst und geben Sie sie dort ein: unter Linux "
        "sha256sum bericht.pdf, unter macOS shasum -a 256 bericht.pdf, unter Windows "
        "certutil -hashfile bericht.pdf SHA256. Das Ergebnis hat 64 Zeichen, 0-9 und a-f."
    ),
    "verify_proves_heading": "Was eine Übereinstimmung beweist",
    "verify_proves": (
        "Die Seite bestätigt dann den Standort ({site}), den Zeitraum ({period}) und den "
        "Zeitpunkt der Erzeugung ({when}), und nichts weiter. Eine Übereinstimmung beweist, "
        "dass diese Datei Byte für Byte der Bericht ist, den dieses System damals erzeugt hat: "
        "Kein Messwert, keine Notiz und keine Seite wurde seitdem verändert. Jede Änderung, "
        "auch eines einzigen Messwerts, ergibt eine andere Prüfsumme, die die Seite ablehnt."
    ),
    "verify_not_heading": "Was sie nicht beweist",
    "verify_not": (
        "Sie beweist nicht, dass die Messwerte stimmten (ein Sensor kann falsch, falsch "
        "platziert oder nicht kalibriert sein), dass nichts geschah, was die Sensoren nicht "
        "gemessen haben, oder wer eine Papierkopie gedruckt oder unterschrieben hat. Eine "
        "Papierkopie hat keine Prüfsumme: Prüfen Sie die Datei, aus der sie gedruckt wurde. "
        "Eine Prüfsumme, die die Seite nicht kennt, bedeutet: Die Datei wurde verändert oder "
        "ist kein Bericht dieses Systems. Bitten Sie den Betreiber, ihn erneut zu erzeugen."
    ),
    "verify_checkpoint": "Der signierte Checkpoint des Prüfpfads bei der Erzeugung",
    "verify_checkpoint_body": (
        "Ursprung, Baumgröße und Wurzel-Hash des Prüfpfads des Kontos bei der Erzeugung des "
        "Berichts, signiert mit dem Schlüssel des Betreibers (C2SP Signed Note, Ed25519). "
        "Wer den Prüfschlüssel des Betreibers hat, kann die Signatur prüfen und dass spätere "
        "Checkpoints diesen fortsetzen (docs/audit.md)."
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
