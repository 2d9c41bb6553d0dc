"""Generate the bundled sample data drops for sftflow.

Run from the repository root:

    python data/make_sample_drops.py

The script uses only the Python standard library and a fixed random seed
(``SEED``), so every run produces byte-identical files.  It writes into the
``drops/`` directory next to this file, overwriting whatever is there:

    drops/unit-conversions/rows.json   Alpaca (instruction/input/output), JSON array
    drops/json-extraction/rows.jsonl   OpenAI "messages", JSON Lines
    drops/arithmetic/rows.csv          prompt/completion, CSV with header
    drops/support-chats/rows.json      ShareGPT ("conversations"), JSON array

Each drop directory also gets an empty ``_SUCCESS`` marker file.

Every drop mixes templated, checkable good rows with a few deliberately bad
rows (and some exact duplicates) at fixed positions, so that validation,
filtering and de-duplication code has something to catch.  The positions are
the ``*_LAYOUT`` dictionaries below; see ``drops/README.md`` for the list.
All text is ASCII except the degree sign used by the temperature rows.
"""

from __future__ import annotations

import csv
import io
import json
import random
from decimal import Decimal
from pathlib import Path

SEED = 20240601
DROPS_DIR = Path(__file__).resolve().parent / "drops"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def fmt_num(d: Decimal) -> str:
    """Plain decimal text without exponent or trailing zeros: 3.50 -> '3.5'."""
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def assemble(good: list, layout: dict, total: int) -> list:
    """Place special rows at fixed 1-based positions, good rows everywhere else.

    ``layout`` maps a 1-based position to ``("bad", row)`` or
    ``("dup", earlier_position)``; a duplicate repeats, verbatim, the row that
    ended up at the earlier position.
    """
    assert total == len(good) + len(layout), (total, len(good), len(layout))
    out: list = []
    it = iter(good)
    for pos in range(1, total + 1):
        if pos in layout:
            kind, value = layout[pos]
            if kind == "dup":
                assert value < pos
                out.append(out[value - 1])
            else:
                out.append(value)
        else:
            out.append(next(it))
    assert next(it, None) is None
    return out


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def write_drop(name: str, filename: str, text: str) -> Path:
    drop = DROPS_DIR / name
    write_text(drop / filename, text)
    write_text(drop / "_SUCCESS", "")
    return drop / filename


# --------------------------------------------------------------------------
# 1. unit-conversions: Alpaca, JSON array
# --------------------------------------------------------------------------

UNIT_SYSTEM = [
    "You are a precise unit converter.",
    "You convert quantities between units and answer with the result only.",
]

# (kind, from-unit, to-unit, target-unit name used in the instruction)
UNIT_KINDS = ["km_m", "kg_g", "h_min", "c_f", "l_ml"]
UNIT_TARGET_NAME = {
    "km_m": "metres",
    "kg_g": "grams",
    "h_min": "minutes",
    "c_f": "degrees Fahrenheit",
    "l_ml": "millilitres",
}
UNIT_FROM_NAME = {
    "km_m": "kilometres",
    "kg_g": "kilograms",
    "h_min": "hours",
    "c_f": "degrees Celsius",
    "l_ml": "litres",
}


def unit_value(rng: random.Random, kind: str) -> tuple[str, str, str, str]:
    """Return (input quantity, answer, from-unit symbol, to-unit symbol)."""
    if kind in ("km_m", "kg_g", "l_ml"):
        # value in thousandths so the x1000 answer is an exact integer
        step = rng.choice([1000, 500, 250, 100, 50, 5])
        milli = step * rng.randint(1, 60)
        value = Decimal(milli) / 1000
        sym = {"km_m": ("km", "m"), "kg_g": ("kg", "g"), "l_ml": ("L", "mL")}[kind]
        return fmt_num(value), str(milli), sym[0], sym[1]
    if kind == "h_min":
        quarters = rng.randint(1, 48)  # 0.25 h .. 12 h
        value = Decimal(quarters) / 4
        return fmt_num(value), str(quarters * 15), "h", "min"
    if kind == "c_f":
        celsius = 5 * rng.randint(-8, 24)  # -40 .. 120, multiples of 5
        fahrenheit = celsius * 9 // 5 + 32  # exact because celsius % 5 == 0
        return str(celsius), str(fahrenheit), "\u00b0C", "\u00b0F"
    raise ValueError(kind)


def unit_good_row(rng: random.Random) -> dict:
    kind = rng.choice(UNIT_KINDS)
    value, answer, src, dst = unit_value(rng, kind)
    target = UNIT_TARGET_NAME[kind]
    quantity = f"{value} {src}"
    output = f"{answer} {dst}"
    style = rng.random()
    if style < 0.55:
        instruction = f"Convert the quantity to {target}."
        inp = quantity
    elif style < 0.75:
        instruction = f"Express this amount in {target}."
        inp = quantity
    elif style < 0.9:
        instruction = f"Convert {quantity} to {target}."
        inp = ""
    else:
        instruction = f"How many {target} are in {value} {UNIT_FROM_NAME[kind]}?"
        inp = ""
    return {"instruction": instruction, "input": inp, "output": output}


def make_unit_conversions(rng: random.Random) -> str:
    good: list[dict] = []
    seen: set[tuple[str, str]] = set()
    while len(good) < 110:
        row = unit_good_row(rng)
        key = (row["instruction"], row["input"])
        if key in seen:
            continue
        seen.add(key)
        good.append(row)
    # exactly 22 of 110 (20%) get a system prompt; key order: system first
    for i in sorted(rng.sample(range(len(good)), 22)):
        good[i] = {"system": rng.choice(UNIT_SYSTEM), **good[i]}

    layout = {
        9: ("bad", {  # empty answer
            "instruction": "Convert the quantity to grams.",
            "input": "2.5 kg",
            "output": "",
        }),
        33: ("bad", {  # missing the "instruction" key
            "input": "4 km",
            "output": "4000 m",
        }),
        48: ("dup", 12),
        61: ("bad", {  # output has the wrong type (number, not string)
            "instruction": "Convert the quantity to minutes without the unit.",
            "input": "0.7 h",
            "output": 42,
        }),
        88: ("bad", {  # whitespace-only instruction
            "instruction": "   ",
            "input": "1.5 L",
            "output": "1500 mL",
        }),
        104: ("dup", 71),
    }
    rows = assemble(good, layout, 116)
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------
# 2. json-extraction: OpenAI messages, JSON Lines
# --------------------------------------------------------------------------

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam",
    "Chen", "Sofia", "Tomas", "Amara", "Noah", "Ingrid", "Rahul", "Elena",
    "Kwame", "Hana", "Lucas", "Zara",
]
LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad",
    "Murphy", "Wei", "Rossi", "Novak", "Okafor", "Becker", "Larsen",
    "Sharma", "Garcia", "Mensah", "Kim", "Martin", "Ali",
]
CITIES = [
    "Lisbon", "Toronto", "Nairobi", "Osaka", "Krakow", "Lima", "Dublin",
    "Melbourne", "Oslo", "Austin", "Porto", "Seoul", "Accra", "Denver",
    "Munich", "Valencia",
]
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Born and raised in {city}, {name} is now {age} years old.",
    "{name} ({age}) recently moved to {city}.",
    "Our new customer, {name}, is {age} and is based in {city}.",
    "At {age}, {name} runs a small bakery in {city}.",
    "{name} turned {age} last week and celebrated in {city}.",
    "The applicant, {name}, age {age}, currently resides in {city}.",
]
# (instruction prefix, requested keys in answer order)
EXTRACTIONS = [
    ("Extract name and age as JSON:", ("name", "age")),
    ("Extract the city as JSON:", ("city",)),
    ("Extract name and city as JSON:", ("name", "city")),
    ("Extract the age as JSON:", ("age",)),
    ("Extract name, age and city as JSON:", ("name", "age", "city")),
    ("Return the person's name as JSON:", ("name",)),
]
EXTRACT_SYSTEM = [
    "You extract structured data from text and reply with compact JSON only.",
    "Reply with a single JSON object and nothing else.",
]


def extraction_pair(rng: random.Random) -> tuple[str, str]:
    record = {
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "age": rng.randint(18, 79),
        "city": rng.choice(CITIES),
    }
    sentence = rng.choice(SENTENCES).format(**record)
    prefix, keys = rng.choice(EXTRACTIONS)
    answer = json.dumps({k: record[k] for k in keys})
    return f"{prefix} {sentence}", answer


def make_json_extraction(rng: random.Random) -> str:
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(pairs) < 100:
        user, answer = extraction_pair(rng)
        if user in seen:
            continue
        seen.add(user)
        pairs.append((user, answer))
    as_parts = set(rng.sample(range(100), 25))  # exactly 25% list-of-parts
    with_system = set(rng.sample(range(100), 30))

    good: list[str] = []
    for i, (user, answer) in enumerate(pairs):
        content = [{"type": "text", "text": user}] if i in as_parts else user
        messages = []
        if i in with_system:
            messages.append({"role": "system", "content": rng.choice(EXTRACT_SYSTEM)})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": answer})
        good.append(json.dumps({"messages": messages}))

    truncated = '{"messages": [{"role": "user", "content": "Extract'
    only_user = json.dumps({"messages": [
        {"role": "user", "content": "Extract the city as JSON: Liam Murphy is 29 years old and lives in Dublin."},
    ]})
    ends_with_user = json.dumps({"messages": [
        {"role": "user", "content": "Extract the age as JSON: Hana Kim (41) recently moved to Seoul."},
        {"role": "assistant", "content": '{"age": 41}'},
        {"role": "user", "content": "Now extract the city as JSON."},
    ]})
    narrator = json.dumps({"messages": [
        {"role": "narrator", "content": "The assistant reads the sentence carefully."},
        {"role": "user", "content": "Extract name and age as JSON: Olga Petrova, aged 52, lives in Oslo."},
        {"role": "assistant", "content": '{"name": "Olga Petrova", "age": 52}'},
    ]})
    layout = {
        14: ("bad", truncated),
        37: ("bad", only_user),
        53: ("bad", ""),  # blank line (not a row)
        71: ("bad", ends_with_user),
        92: ("bad", narrator),
    }
    lines = assemble(good, layout, 105)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# 3. arithmetic: prompt/completion, CSV
# --------------------------------------------------------------------------

def arithmetic_pair(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["+", "plus", "times", "minus", "-", "divided by"])
    if op in ("+", "plus"):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        result = a + b
    elif op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    elif op in ("minus", "-"):
        a = rng.randint(10, 200)
        b = rng.randint(1, a)
        result = a - b
    else:
        b = rng.randint(2, 12)
        result = rng.randint(2, 12)
        a = b * result
    return f"What is {a} {op} {b}?", str(result)


def make_arithmetic(rng: random.Random) -> str:
    good: list[list[str]] = []
    seen: set[str] = set()
    while len(good) < 100:
        prompt, completion = arithmetic_pair(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        good.append([prompt, completion])
    # positions are data-row positions (file line = position + 1)
    layout = {
        18: ("bad", ["What is 12 + 30?", ""]),           # empty completion
        47: ("bad", ["What is 6 times 8?", "48", "48"]),  # 3 fields
        76: ("dup", 25),                                  # exact duplicate
    }
    rows = assemble(good, layout, 103)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["prompt", "completion"])
    writer.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------
# 4. support-chats: ShareGPT, JSON array
# --------------------------------------------------------------------------

# Fixed weekly schedule of the (fictional) store; None means closed.
SCHEDULE = {
    "Monday": ("9:00", "18:00"),
    "Tuesday": ("9:00", "18:00"),
    "Wednesday": ("9:00", "20:00"),
    "Thursday": ("9:00", "18:00"),
    "Friday": ("9:00", "21:00"),
    "Saturday": ("10:00", "16:00"),
    "Sunday": None,
}
# Fixed order table: order id -> (status, date)
ORDERS = {
    "A1001": ("shipped", "June 12"),
    "A1002": ("delivered", "June 3"),
    "A1003": ("processing", "June 18"),
    "A1004": ("shipped", "June 14"),
    "A1005": ("delivered", "May 30"),
    "A1006": ("processing", "June 20"),
    "A1007": ("shipped", "June 11"),
    "A1008": ("delivered", "June 5"),
    "A1009": ("shipped", "June 15"),
    "A1010": ("processing", "June 22"),
    "A1011": ("delivered", "June 1"),
    "A1012": ("shipped", "June 13"),
}
SUPPORT_SYSTEM = [
    "You are the customer support assistant of Northwind Store. Answer briefly using the store schedule and order records.",
    "You are a helpful store assistant. Keep answers to one sentence.",
]


def hours_sentence(day: str) -> str:
    hours = SCHEDULE[day]
    if hours is None:
        return f"No, we are closed on {day}."
    return f"Yes, on {day} we are open from {hours[0]} to {hours[1]}."


def support_candidates() -> list[list[tuple[str, str]]]:
    """All templated two-exchange dialogues, as (human, gpt) pairs."""
    dialogues: list[list[tuple[str, str]]] = []
    days = list(SCHEDULE)
    # open/close time on a given day
    for day in days:
        hours = SCHEDULE[day]
        for ask_open, ask_close in (
            (f"What time do you open on {day}?", "And close?"),
            (f"When does the store open on {day}?", "And when do you close that day?"),
            (f"What are your opening hours on {day}? When do you open?", "What about closing time?"),
        ):
            if hours is None:
                dialogues.append([
                    (ask_open, f"We are closed on {day}."),
                    (ask_close, f"We are closed all day on {day}, so there is no closing time."),
                ])
            else:
                dialogues.append([
                    (ask_open, f"We open at {hours[0]} on {day}."),
                    (ask_close, f"We close at {hours[1]} on {day}."),
                ])
    # are you open on X? what about Y?
    for i, day in enumerate(days):
        for step in (1, 2, 3):
            other = days[(i + step) % len(days)]
            dialogues.append([
                (f"Are you open on {day}?", hours_sentence(day)),
                (f"What about {other}?", hours_sentence(other)),
            ])
    # order status then arrival
    for order, (status, date) in ORDERS.items():
        if status == "delivered":
            second = f"Order {order} was delivered on {date}."
        else:
            second = f"Order {order} is expected to arrive on {date}."
        for ask_status, ask_when in (
            (f"What is the status of order {order}?", "When will it arrive?"),
            (f"Can you check order {order} for me?", "What is the delivery date?"),
        ):
            dialogues.append([
                (ask_status, f"Order {order} is {status}."),
                (ask_when, second),
            ])
    return dialogues


def make_support_chats(rng: random.Random) -> str:
    candidates = support_candidates()
    picked = rng.sample(candidates, 60)
    in_conv_system = set(rng.sample(range(60), 9))
    remaining = [i for i in range(60) if i not in in_conv_system]
    top_level_system = set(rng.sample(remaining, 9))

    good: list[dict] = []
    for i, dialogue in enumerate(picked):
        turns: list[dict] = []
        if i in in_conv_system:
            turns.append({"from": "system", "value": rng.choice(SUPPORT_SYSTEM)})
        for human, gpt in dialogue:
            turns.append({"from": "human", "value": human})
            turns.append({"from": "gpt", "value": gpt})
        row: dict = {"conversations": turns}
        if i in top_level_system:
            row["system"] = rng.choice(SUPPORT_SYSTEM)
        good.append(row)

    layout = {
        23: ("bad", {"conversations": [  # empty final assistant turn
            {"from": "human", "value": "What time do you open on Thursday?"},
            {"from": "gpt", "value": "We open at 9:00 on Thursday."},
            {"from": "human", "value": "And close?"},
            {"from": "gpt", "value": ""},
        ]}),
        47: ("bad", {  # conversations is a string, not a list
            "conversations": "human: Is order A1004 shipped? gpt: Yes, order A1004 is shipped.",
        }),
    }
    rows = assemble(good, layout, 62)
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------

def main() -> None:
    rng = random.Random(SEED)
    written = [
        write_drop("unit-conversions", "rows.json", make_unit_conversions(rng)),
        write_drop("json-extraction", "rows.jsonl", make_json_extraction(rng)),
        write_drop("arithmetic", "rows.csv", make_arithmetic(rng)),
        write_drop("support-chats", "rows.json", make_support_chats(rng)),
    ]
    for path in written:
        print(f"wrote {path.relative_to(DROPS_DIR.parent)} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
