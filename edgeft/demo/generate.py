"""Generates the demo's shipped data: a pretraining corpus, the task dataset and a general held-out text.

The task: a gateway telemetry line -> a one-line JSON alert. The corpus has the same kinds of lines
but never pairs a reading with its correct alert, so the base model knows the formats, not the task,
and fine-tuning has something measurable to teach. The general held-out text is a fresh sample of the
corpus's distribution (its own seed; the base never trains on it): its perplexity before and after
fine-tuning is the forgetting check (edgeft.evaluate).

Run `python -m edgeft.demo.generate` to rewrite the shipped files (deterministic: same seed, same bytes).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS_FILE = HERE / "corpus.txt"
TASK_FILE = HERE / "alerts.jsonl"
GENERAL_FILE = HERE / "general.txt"
SEED = 1234
GENERAL_SEED = 4321  # not SEED: another sample of the same kinds of lines
ALERTS = ("overheat", "low_battery", "link_errors", "ok")


def reading(rng: random.Random, alert: str) -> dict[str, int | str]:
    """A telemetry reading with exactly one anomaly, the one `alert` names (none for "ok"), so the rules
    in `alert_for` never compete: a tiny model learns it in a minute of fine-tuning."""
    while True:
        values = {
            "device": f"gw-{rng.randrange(10, 100)}",
            "temp": rng.randrange(20, 100),
            "batt": rng.randrange(1, 100),
            "rssi": -rng.randrange(40, 100),
            "errs": rng.randrange(0, 10),
        }
        anomalies = (values["temp"] >= 80) + (values["batt"] < 20) + (values["errs"] >= 5)
        if alert_for(values) == alert and anomalies == (alert != "ok"):
            return values


def alert_for(values: dict[str, int | str]) -> str:
    """The task's rules, in priority order."""
    if values["temp"] >= 80:
        return "overheat"
    if values["batt"] < 20:
        return "low_battery"
    if values["errs"] >= 5:
        return "link_errors"
    return "ok"


def telemetry_line(values: dict[str, int | str]) -> str:
    # Fixed-width fields, as gateway firmware writes them (batt=07, not batt=7): every alert rule then reads
    # one digit at a fixed place. With a variable width, "battery < 20" was two rules (one digit, or "1x"),
    # and the 0.8M-parameter demo model learned only one of them on some seeds and CPUs.
    return f"{values['device']} temp={values['temp']} batt={values['batt']:02d} rssi={values['rssi']} errs={values['errs']}"


def alert_json(device: str, alert: str) -> str:
    return json.dumps({"device": device, "alert": alert}, separators=(",", ":"))


def corpus(rng: random.Random, lines: int) -> str:
    """Telemetry lines, alert lines with *random* content, and readings followed by a status record of
    the same device: the model learns the formats and to carry a device id over, never the alert rules."""
    out = []
    for _ in range(lines):
        values = reading(rng, rng.choice(ALERTS))
        kind = rng.random()
        if kind < 0.35:
            out.append(telemetry_line(values))
        elif kind < 0.6:
            out.append(alert_json(f"gw-{rng.randrange(10, 100)}", rng.choice(ALERTS)))
        else:
            out.append(telemetry_line(values))
            status = rng.choice(("seen", "late", "rebooted", "updated"))
            out.append(json.dumps({"device": values["device"], "status": status}, separators=(",", ":")))
    return "\n".join(out) + "\n"


def task_examples(rng: random.Random, count: int) -> list[dict[str, str]]:
    examples = []
    for index in range(count):
        values = reading(rng, ALERTS[index % len(ALERTS)])
        examples.append({"prompt": telemetry_line(values) + "\n", "completion": alert_json(values["device"], alert_for(values))})
    rng.shuffle(examples)
    return examples


def main() -> None:
    rng = random.Random(SEED)
    CORPUS_FILE.write_text(corpus(rng, 12000))
    with TASK_FILE.open("w") as f:
        for example in task_examples(rng, 2400):
            f.write(json.dumps(example) + "\n")
    GENERAL_FILE.write_text(corpus(random.Random(GENERAL_SEED), 300))
    print(f"wrote {CORPUS_FILE}, {TASK_FILE} and {GENERAL_FILE}")


if __name__ == "__main__":
    main()
