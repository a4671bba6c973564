"""Generate the bundled demo task: free-text sales-call notes -> one fixed JSON schema.

    python -m lorakit.demo.make_data      # rewrites train.jsonl, eval.jsonl and the *_pairs.jsonl beside this file

The notes are terse and varied (abbreviated weekdays, "$1,250" / "1250 USD" / "12k",
people and companies in any order); the answer is always the same five keys in the same
order, with the amount as an integer number of dollars and the weekday spelled out.
A small instruct model does not produce this schema on its own; a LoRA adapter learns it
from a few hundred examples. The held-out split uses names and companies that never
appear in training, so exact match there measures the format, not memorised people.

The preference pairs (train_pairs.jsonl, eval_pairs.jsonl) take the same notes and prefer the
exact schema over the wrong answers that a briefly tuned adapter gives (the DPO demo's first
stage, a few supervised steps): the weekday copied as the note writes it ("wed", "next fri"),
a "k" amount with one zero too many, contact and company swapped, or the weekday under a
made-up key ("usd") in place of "follow_up".
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SYSTEM = "Convert the sales note to JSON."

FIRST = ["Priya", "Tom", "Ana", "Kenji", "Lena", "Omar", "Grace", "Ivan", "Chloe", "Diego", "Mei", "Sam",
         "Nora", "Raj", "Elif", "Jonas", "Ruth", "Ayo", "Lucas", "Hana", "Marta", "Felix", "Zoe", "Ali"]
LAST = ["Shah", "Becker", "Silva", "Tanaka", "Novak", "Haddad", "Kim", "Petrov", "Martin", "Lopez", "Chen",
        "Okafor", "Berg", "Iyer", "Demir", "Vogel", "Cohen", "Adeyemi", "Rossi", "Sato", "Nowak", "Klein"]
COMPANIES = ["Northwind", "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne",
             "Tyrell", "Cyberdyne", "Soylent", "Wonka", "Oscorp", "Aperture", "Massive", "Pied Piper",
             "Dunder", "Gringotts", "Monarch", "Blue Sun", "Sirius", "Nakatomi", "Gekko"]
TOPICS = ["renewal", "invoice", "demo", "pricing", "onboarding", "contract", "support", "upgrade"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

TEMPLATES = [
    "call w/ {person} ({company}) re {topic}. {amount}. follow up {day}",
    "{company}: {person} wants to talk {topic}, budget {amount}, ping {day}",
    "Met {person} from {company} about the {topic}; quoted {amount}; next touchpoint {day}.",
    "{topic} - {company} / {person} - {amount} - back to them {day}",
    "spoke to {person} @ {company}. topic: {topic}. value {amount}. call again {day}",
    "{person} ({company}) asked about {topic}, deal size {amount}, reconnect {day}",
]


def _day(rng: random.Random, day: str) -> str:
    return rng.choice([day, day.lower(), day[:3], day[:3].lower() + ".", "next " + day[:3].lower()])


def _amount(rng: random.Random) -> tuple[int, str]:
    style = rng.randrange(4)
    if style == 0:
        value = rng.randrange(5, 99) * 1000
        return value, f"{value // 1000}k"
    value = rng.randrange(200, 20000, 50)
    if style == 1:
        return value, f"${value:,}"
    if style == 2:
        return value, f"{value} USD"
    return value, f"${value}"


def example(rng: random.Random, firsts: list[str], lasts: list[str], companies: list[str]) -> dict:
    person = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    company = rng.choice(companies)
    topic = rng.choice(TOPICS)
    day = rng.choice(DAYS)
    value, amount = _amount(rng)
    note = rng.choice(TEMPLATES).format(person=person, company=company, topic=topic, amount=amount, day=_day(rng, day))
    answer = json.dumps({"contact": person, "company": company, "topic": topic, "amount_usd": value, "follow_up": day})
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": note},
        {"role": "assistant", "content": answer},
    ]}


def generate(train_size: int = 800, eval_size: int = 32, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    # Held-out people and companies: the last few of each list never appear in training.
    train = [example(rng, FIRST[:-4], LAST[:-4], COMPANIES[:-4]) for _ in range(train_size)]
    held = [example(rng, FIRST[-4:], LAST[-4:], COMPANIES[-4:]) for _ in range(eval_size)]
    return train, held


DAY_WRITTEN = re.compile(r"(?:follow up|ping|touchpoint|back to them|call again|reconnect) (.+?)\.*$")


def rejected_answer(rng: random.Random, note: str, answer: dict) -> str:
    """One of the brief adapter's typical mistakes on this note (see the module docstring)."""
    written = DAY_WRITTEN.search(note).group(1)  # every template ends with the weekday
    kinds = ["swap", "usd"]
    if written != answer["follow_up"]:
        kinds += ["day", "day"]  # the commonest mistake
    if answer["amount_usd"] % 1000 == 0 and f"{answer['amount_usd'] // 1000}k" in note:
        kinds.append("amount")
    kind = rng.choice(kinds)
    wrong = dict(answer)
    if kind == "day":
        wrong["follow_up"] = written
    elif kind == "amount":
        wrong["amount_usd"] = answer["amount_usd"] * 10
    elif kind == "swap":
        wrong["contact"], wrong["company"] = answer["company"], answer["contact"]
    else:
        wrong = {k: v for k, v in answer.items() if k != "follow_up"} | {"usd": written}
    return json.dumps(wrong)


def preference_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Chat preference rows: the exact schema chosen, a typical wrong answer rejected (shared prompt turns)."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        prompt, good = row["messages"][:-1], row["messages"][-1]["content"]
        bad = rejected_answer(rng, prompt[-1]["content"], json.loads(good))
        pairs.append({"chosen": [*prompt, {"role": "assistant", "content": good}],
                      "rejected": [*prompt, {"role": "assistant", "content": bad}]})
    return pairs


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    here = Path(__file__).parent
    train, held = generate()
    write(train, here / "train.jsonl")
    write(held, here / "eval.jsonl")
    print(f"wrote {len(train)} training and {len(held)} held-out examples to {here}")
    # Preference pairs for `--objective dpo|orpo` on the same notes (the held-out pairs on held-out notes).
    write(preference_pairs(train[:400], seed=1), here / "train_pairs.jsonl")
    write(preference_pairs(held, seed=2), here / "eval_pairs.jsonl")
    print(f"wrote 400 training and {len(held)} held-out preference pairs to {here}")


if __name__ == "__main__":
    main()
