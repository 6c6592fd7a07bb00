"""The SGLang paper's program workloads, Loom against Transformers, side by side in one run.

Each workload is written twice: once as an `@sgl.function` program run with `run_batch` on a
`loom.Runtime` (the engine's processes behind the ZeroMQ front door), and once the way a
Transformers user writes it: a Python loop of `model.generate` / forward calls with the model's
own tokenizer and chat template, no KV reuse between calls beyond what `generate` does itself.

1. mmlu       few-shot MMLU-style: a shared few-shot block, a question, select among A/B/C/D
2. hellaswag  HellaSwag-style: a few solved examples, a context, select among 4 endings
              (token_length_normalized)
3. tot        tree of thought: fork 3 branches, gen a thought in each, select the best
4. json       JSON extraction: gen constrained by a regex (Transformers: plain generate, since
              it has no constraint)
5. chat       multi-turn chat: system + several user turns, each answered by gen
6. react      ReAct agent: thought gen, select an action among tools, observation appended,
              repeated a few steps

Systems: Loom (radix cache on), Loom (`disable_radix_cache=True`), Transformers. Transformers'
select is a forward pass per choice (prompt + choice) scored the same way (mean log-probability
of the choice's tokens). Greedy everywhere, fixed seeds; the model is the SmolLM2-135M-shaped
random model (`loom.demo_model.bench_model_path`) unless `--model` names another checkpoint.

    python benchmarks/bench_programs.py                        # all six (~15 min on 2 CPU cores)
    python benchmarks/bench_programs.py --workloads mmlu,json  # a subset
    python benchmarks/bench_programs.py --quick --model PATH   # a tiny smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import loom as sgl

SEED = 0
LETTERS = ["A", "B", "C", "D"]
TOOLS = ["search", "calculate", "lookup", "finish"]
JSON_REGEX = r'\{"name": "[A-Z][a-z]{1,12}", "age": [1-9][0-9]?, "city": "[A-Z][a-z]{1,12}"\}'

NAMES = ["Anna", "Marco", "Lena", "Tomas", "Ines", "Omar", "Yuki", "Pavel", "Sofia", "Kwame", "Elif", "Rosa"]
CITIES = ["Lisbon", "Oslo", "Lima", "Porto", "Kyoto", "Cairo", "Quito", "Turin", "Gdansk", "Accra"]
SUBJECTS = ["arithmetic", "geography", "history", "biology", "physics", "chemistry", "economics", "music"]
OBJECTS = ["bread", "apples", "cheese", "flowers", "books", "ships", "chairs", "lamps", "coins", "maps"]


# ----------------------------------------------------------------------------- data


def mmlu_question(rng: random.Random) -> tuple[str, list[str], int]:
    """A made-up four-way multiple-choice question (text, options, index of the answer)."""
    a, b = rng.randrange(10, 90), rng.randrange(10, 90)
    subject = rng.choice(SUBJECTS)
    name, obj, city = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CITIES)
    text = (f"In a {subject} class in {city}, {name} has {a} {obj} and buys {b} more at the market "
            f"on the way home. How many {obj} does {name} have now?")  # fmt: skip
    options = [a + b, a + b + rng.randrange(1, 9), abs(a - b) + 1, a * 2 + 3]
    order = list(range(4))
    rng.shuffle(order)
    return text, [str(options[i]) for i in order], order.index(0)


def mmlu_block(q: tuple[str, list[str], int], answer: bool) -> str:
    text, options, correct = q
    block = f"Question: {text}\n" + "".join(f"{l}. {o}\n" for l, o in zip(LETTERS, options)) + "Answer:"
    return block + (f" {LETTERS[correct]}\n\n" if answer else "")


def hellaswag_item(rng: random.Random) -> tuple[str, list[str]]:
    name, obj, city = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CITIES)
    context = (f"{name} walks to the market in {city} on a quiet morning with a basket. "
               f"At the first stall, {name} picks up some {obj} and")  # fmt: skip
    endings = [
        " pays the old man, smiling, then walks on towards the harbour to see the ships.",
        " throws them into the sea while the gulls watch from the roof of the station.",
        f" counts them twice, puts them in the basket and asks about the price of {rng.choice(OBJECTS)}.",
        f" starts to sing a song about {rng.choice(CITIES)} and the long winter by the river.",
    ]
    rng.shuffle(endings)
    return context, endings


HELLASWAG_SHOTS = "".join(
    f"{c}{e[0]}\n\n" for c, e in (hellaswag_item(random.Random(1000 + i)) for i in range(4))
)
MMLU_HEADER = "The following are multiple choice questions (with answers) about everyday arithmetic.\n\n"
TOT_SYSTEM = ("You are a careful planner. For each task, think of one short plan, step by step. "
              "Plans are compared afterwards and the best one is kept.")  # fmt: skip
CHAT_SYSTEM = "You are a helpful assistant. You answer questions politely and briefly."
REACT_SYSTEM = (
    "You answer questions by thinking and using tools. Tools: search (look up a fact on the web), "
    "calculate (evaluate arithmetic), lookup (find a word in the last result), finish (give the "
    "answer). Each step has a Thought, an Action and an Observation."
)


def make_inputs(workload: str, n: int, chat_turns: int) -> list[dict[str, Any]]:
    """`n` program inputs for `workload`, the same for every system (seeded)."""
    rng = random.Random(f"{SEED}-{workload}")
    out: list[dict[str, Any]] = []
    for _ in range(n):
        name, obj, city, age = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CITIES), rng.randrange(18, 90)
        if workload == "mmlu":
            out.append({"question": mmlu_block(mmlu_question(rng), answer=False)})
        elif workload == "hellaswag":
            context, endings = hellaswag_item(rng)
            out.append({"context": context, "endings": endings})
        elif workload == "tot":
            out.append({"task": f"{name} must carry {rng.randrange(5, 50)} {obj} from {city} to the harbour before noon."})
        elif workload == "json":
            out.append({"text": f"{name} is {age} years old, lives in {city} and sells {obj} at the market."})
        elif workload == "chat":
            out.append({"questions": [f"Tell me about the {rng.choice(OBJECTS)} of {rng.choice(CITIES)}." for _ in range(chat_turns)]})
        elif workload == "react":
            out.append({"question": f"How many {obj} did {name} sell in {city} last year, and what is that times {rng.randrange(2, 9)}?"})
        else:
            raise ValueError(f"unknown workload {workload!r}")
    return out


# Built from a fixed seed so the few-shot block is the same in every program and every system.
MMLU_SHOTS = MMLU_HEADER + "".join(mmlu_block(mmlu_question(random.Random(100 + i)), answer=True) for i in range(5))


@dataclasses.dataclass
class Sizes:
    """Generation lengths, shared by Loom's and Transformers' versions of each program."""

    thought_tokens: int = 24
    json_tokens: int = 40
    chat_tokens: int = 24
    chat_turns: int = 4
    react_tokens: int = 16
    react_steps: int = 3


# ----------------------------------------------------------------------------- Loom programs


def loom_programs(z: Sizes) -> dict[str, Callable]:
    @sgl.function
    def mmlu(s, question):
        s += MMLU_SHOTS + question + sgl.select("answer", [" " + l for l in LETTERS])

    @sgl.function
    def hellaswag(s, context, endings):
        s += HELLASWAG_SHOTS + context + sgl.select("ending", endings, choices_method=sgl.token_length_normalized)

    @sgl.function
    def tot(s, task):
        s += sgl.system(TOT_SYSTEM)
        s += sgl.user_begin() + f"Task: {task}\n"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Plan {i + 1}:" + sgl.gen("thought", max_tokens=z.thought_tokens, temperature=0)
        s += "".join(f"Plan {i + 1}:{f['thought']}\n" for i, f in enumerate(forks))
        s += sgl.user_end() + sgl.assistant_begin() + "The best plan is Plan" + sgl.select("best", [" 1", " 2", " 3"])
        s += sgl.assistant_end()
        return [f.get_meta_info("thought") for f in forks]

    @sgl.function
    def json(s, text):
        s += sgl.user(f"Extract the person as JSON with name, age and city.\n{text}")
        s += sgl.assistant(sgl.gen("json", max_tokens=z.json_tokens, regex=JSON_REGEX, temperature=0))

    @sgl.function
    def chat(s, questions):
        s += sgl.system(CHAT_SYSTEM)
        for i, q in enumerate(questions):
            s += sgl.user(q)
            s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=z.chat_tokens, temperature=0))

    @sgl.function
    def react(s, question):
        s += sgl.system(REACT_SYSTEM)
        s += sgl.user(question)
        s += sgl.assistant_begin()
        for step in range(z.react_steps):
            s += f"Thought {step + 1}:" + sgl.gen(f"thought_{step}", max_tokens=z.react_tokens, stop="\n", temperature=0)
            s += f"\nAction {step + 1}:" + sgl.select(f"action_{step}", [" " + t for t in TOOLS]) + "\n"
            action = s[f"action_{step}"].strip()
            if action == "finish":
                break
            s += f"Observation {step + 1}: {observe(action, step)}\n"
        s += sgl.assistant_end()

    return {"mmlu": mmlu, "hellaswag": hellaswag, "tot": tot, "json": json, "chat": chat, "react": react}


def observe(action: str, step: int) -> str:
    """The toy tools' answer (text the program appends after an action)."""
    return {"search": f"result {step}: the market sold 1200 of them last year.", "calculate": "4800",
            "lookup": "found: 1200 in the second line."}.get(action, "")  # fmt: skip


def loom_names(workload: str, state: Any, z: Sizes) -> list[str]:
    """The gen/select names whose meta_info the state holds (for the cached-token fraction)."""
    return {
        "mmlu": ["answer"], "hellaswag": ["ending"], "tot": ["best"], "json": ["json"],
        "chat": [f"answer_{i}" for i in range(z.chat_turns)],
        "react": [n for step in range(z.react_steps) for n in (f"thought_{step}", f"action_{step}") if n in state],
    }[workload]  # fmt: skip


def loom_answer(workload: str, state: Any, z: Sizes) -> Any:
    """What the program decided (compared with Transformers' decisions)."""
    if workload in ("mmlu", "hellaswag", "tot"):
        return state[{"mmlu": "answer", "hellaswag": "ending", "tot": "best"}[workload]].strip()
    if workload == "react":
        return [state[f"action_{i}"].strip() for i in range(z.react_steps) if f"action_{i}" in state]
    return None


# ----------------------------------------------------------------------------- Transformers


class HFRunner:
    """The same programs, written the way a Transformers user writes them."""

    def __init__(self, model_path: str, z: Sizes, dtype: str = "auto") -> None:
        from hf_reference import hf_model, hf_tokenizer  # benchmarks/hf_reference.py

        self.tok = hf_tokenizer(model_path)
        self.model = hf_model(model_path, dtype)  # in the dtype Loom runs (auto: bf16 on a bf16 CPU)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.z = z

    def chat_text(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    @torch.inference_mode()
    def generate(self, text: str, max_new_tokens: int, stop: str | None = None) -> str:
        ids = self.tok(text, return_tensors="pt").input_ids
        extra = {"stop_strings": [stop], "tokenizer": self.tok} if stop else {}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.pad, **extra)  # fmt: skip
        text_out = self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return text_out.split(stop)[0] if stop else text_out

    @torch.inference_mode()
    def select(self, prompt: str, choices: list[str]) -> int:
        """One forward pass per choice; the choice with the best mean token log-probability."""
        n_prompt = len(self.tok(prompt).input_ids)
        scores = []
        for choice in choices:
            ids = self.tok(prompt + choice, return_tensors="pt").input_ids
            logprobs = torch.log_softmax(self.model(ids).logits[0, :-1].float(), dim=-1)
            target = ids[0, n_prompt:]
            scores.append(logprobs[n_prompt - 1 :].gather(1, target[:, None]).mean().item())
        return max(range(len(choices)), key=scores.__getitem__)

    def run(self, workload: str, inp: dict[str, Any]) -> Any:
        z = self.z
        if workload == "mmlu":
            return LETTERS[self.select(MMLU_SHOTS + inp["question"], [" " + l for l in LETTERS])]
        if workload == "hellaswag":
            endings = inp["endings"]
            return endings[self.select(HELLASWAG_SHOTS + inp["context"], endings)].strip()
        if workload == "tot":
            messages = [{"role": "system", "content": TOT_SYSTEM}]
            head = self.chat_text(messages, False) + f"<|im_start|>user\nTask: {inp['task']}\n"
            thoughts = [self.generate(head + f"Plan {i + 1}:", z.thought_tokens) for i in range(3)]
            plans = "".join(f"Plan {i + 1}:{t}\n" for i, t in enumerate(thoughts))
            prompt = head + plans + "<|im_end|>\n<|im_start|>assistant\nThe best plan is Plan"
            return str(self.select(prompt, [" 1", " 2", " 3"]) + 1)
        if workload == "json":
            messages = [{"role": "user", "content": f"Extract the person as JSON with name, age and city.\n{inp['text']}"}]
            return self.generate(self.chat_text(messages), z.json_tokens)  # no constraint: plain generate
        if workload == "chat":
            messages = [{"role": "system", "content": CHAT_SYSTEM}]
            for q in inp["questions"]:
                messages.append({"role": "user", "content": q})
                messages.append({"role": "assistant", "content": self.generate(self.chat_text(messages), z.chat_tokens)})
            return None
        if workload == "react":
            text = self.chat_text([{"role": "system", "content": REACT_SYSTEM}, {"role": "user", "content": inp["question"]}])
            actions = []
            for step in range(z.react_steps):
                text += f"Thought {step + 1}:"
                text += self.generate(text, z.react_tokens, stop="\n")
                text += f"\nAction {step + 1}:"
                action = TOOLS[self.select(text, [" " + t for t in TOOLS])]
                actions.append(action)
                text += " " + action + "\n"
                if action == "finish":
                    break
                text += f"Observation {step + 1}: {observe(action, step)}\n"
            return actions
        raise ValueError(f"unknown workload {workload!r}")


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Result:
    seconds: float
    programs: int
    cached: int = 0
    prompt: int = 0
    answers: list[Any] = dataclasses.field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.programs / self.seconds


def run_loom(model: str, workloads: list[str], inputs: dict[str, list[dict]], z: Sizes, label: str,
             **engine_args: Any) -> dict[str, Result]:  # fmt: skip
    programs = loom_programs(z)
    results: dict[str, Result] = {}
    print(f"starting {label} ...", file=sys.stderr)
    with sgl.Runtime(model_path=model, **engine_args) as rt:
        programs["mmlu"].run(question="Question: warm-up?\nAnswer:", backend=rt, temperature=0)
        for w in workloads:
            rt.flush_cache()
            t0 = time.perf_counter()
            states = programs[w].run_batch(inputs[w], backend=rt, temperature=0, progress_bar=True)
            elapsed = time.perf_counter() - t0
            failed = [s.error() for s in states if s.error() is not None]
            if failed:
                raise RuntimeError(f"{label}, {w}: {len(failed)} program(s) failed; the first: {failed[0]!r}")
            metas = [s.get_meta_info(n) for s in states for n in loom_names(w, s, z)]
            metas += [m for s in states if isinstance(s.ret_value, list) for m in s.ret_value]
            results[w] = Result(elapsed, len(states), sum(m.get("cached_tokens", 0) for m in metas),
                                sum(m.get("prompt_tokens", 0) for m in metas), [loom_answer(w, s, z) for s in states])  # fmt: skip
    return results


def run_hf(model: str, workloads: list[str], inputs: dict[str, list[dict]], z: Sizes, n: int,
           dtype: str = "auto") -> dict[str, Result]:  # fmt: skip
    print("loading Transformers ...", file=sys.stderr)
    hf = HFRunner(model, z, dtype)
    hf.select(MMLU_SHOTS, LETTERS)  # warm-up
    results = {}
    for w in workloads:
        subset = inputs[w][:n]
        t0 = time.perf_counter()
        answers = [hf.run(w, inp) for inp in tqdm(subset, desc=f"transformers {w}", leave=False)]
        results[w] = Result(time.perf_counter() - t0, len(subset), answers=answers)
    return results


TARGETS = {"mmlu": 10.0, "hellaswag": 10.0}  # the few-shot ones; every other workload: 5x


def table(workloads: list[str], on: dict[str, Result], off: dict[str, Result], hf: dict[str, Result]) -> str:
    lines = [
        "| workload | programs (Loom / HF) | Loom radix on (prog/s) | Loom radix off (prog/s) | Transformers (prog/s) "
        "| vs Transformers | vs radix off | cached prompt tokens | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for w in workloads:
        a, b, c = on[w], off[w], hf[w]
        speed, target = a.per_s / c.per_s, TARGETS.get(w, 5.0)
        frac = a.cached / a.prompt if a.prompt else 0.0
        lines.append(f"| {w} | {a.programs} / {c.programs} | {a.per_s:.2f} | {b.per_s:.2f} | {c.per_s:.3f} "
                     f"| {speed:.1f}x | {a.per_s / b.per_s:.1f}x | {frac:.0%} | {target:.0f}x | {'yes' if speed >= target else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def plot(workloads: list[str], on: dict[str, Result], off: dict[str, Result], hf: dict[str, Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'loom[bench]'): no PNG", file=sys.stderr)
        return False
    x = range(len(workloads))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.bar([i - 0.2 for i in x], [on[w].per_s / hf[w].per_s for w in workloads], 0.4, label="Loom, radix cache on")
    ax.bar([i + 0.2 for i in x], [off[w].per_s / hf[w].per_s for w in workloads], 0.4, label="Loom, radix cache off")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.axhline(5, color="tab:red", linestyle="--", linewidth=1, label="5x target (every workload)")
    ax.axhline(10, color="tab:purple", linestyle=":", linewidth=1.2, label="10x target (few-shot)")
    ax.set_yscale("log")
    ax.set_xticks(list(x), workloads)
    ax.set_ylabel("programs/s vs Transformers")
    ax.set_title("Loom vs Transformers on the SGLang program workloads (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


WORKLOADS = ("mmlu", "hellaswag", "tot", "json", "chat", "react")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: the SmolLM2-135M-shaped random model)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--programs", type=int, default=24, help="programs per workload for Loom (both radix settings)")
    p.add_argument("--hf-programs", type=int, default=4,
                   help="programs per workload for Transformers (the first ones of Loom's); its rate is per program")
    p.add_argument("--max-total-tokens", type=int, default=40000, help="Loom's KV cache size in tokens")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="Loom's dtype, and Transformers' (auto: bfloat16 on a CPU with native bf16, else float32)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 2 programs, 1 for Transformers, short gens")
    p.add_argument("--figure", type=Path, default=Path(__file__).parent / "figures" / "programs.png",
                   help="where the PNG bar chart goes (needs matplotlib)")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG")
    p.add_argument("--skip-radix-off", action="store_true", help="do not run Loom with the radix cache off")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(SEED)
    if args.quick:
        args.programs, args.hf_programs = 2, 1
        z = Sizes(thought_tokens=4, json_tokens=24, chat_tokens=4, chat_turns=2, react_tokens=4, react_steps=2)
    else:
        z = Sizes()
    if args.model is None:
        from loom.demo_model import bench_model_path

        args.model = str(bench_model_path())
    inputs = {w: make_inputs(w, args.programs, z.chat_turns) for w in args.workloads}
    engine = {"max_total_tokens": args.max_total_tokens, "dtype": args.dtype}
    on = run_loom(args.model, args.workloads, inputs, z, "Loom, radix cache on", **engine)
    off = on if args.skip_radix_off else run_loom(args.model, args.workloads, inputs, z, "Loom, radix cache off",
                                                  disable_radix_cache=True, **engine)  # fmt: skip
    hf = run_hf(args.model, args.workloads, inputs, z, args.hf_programs, args.dtype)

    print(f"\n## Program workloads ({args.programs} programs per workload for Loom, "
          f"{args.hf_programs} for Transformers; programs/s)\n")  # fmt: skip
    print(table(args.workloads, on, off, hf))
    print()
    for w in args.workloads:
        pairs = [(a, b) for a, b in zip(on[w].answers, hf[w].answers) if a is not None]
        if pairs:
            same = sum(a == b for a, b in pairs)
            print(f"- {w}: Loom's decisions equal Transformers' on {same}/{len(pairs)} programs; "
                  f"radix on == off: {on[w].answers == off[w].answers}")  # fmt: skip
    if "json" in args.workloads:
        print("- json: Loom decodes under the regex; Transformers has no constraint and generates plain text")
    if not args.no_figure and plot(args.workloads, on, off, hf, args.figure):
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
