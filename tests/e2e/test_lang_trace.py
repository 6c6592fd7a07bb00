"""The picture of a run (`state.trace().save(...)`, `RunTrace.of(states)`), drawn from programs run
against a real `loom serve` on a tiny model, parsed back and checked against `get_meta_info`."""

from __future__ import annotations

import html.parser
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

import loom as sgl
from loom.checkpoint_writer import build_tiny_checkpoint
from loom.lang import RunTrace

from server_proc import Server, serving

NOTE = "<script>alert('x')</script> & <b>bold</b>"
FIELDS = ("prompt-tokens", "cached-tokens", "completion-tokens")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with serving(build_tiny_checkpoint(tmp_path_factory.mktemp("trace"), arch="llama", vocab_size=512, seed=3)) as srv:
        yield srv


@pytest.fixture(scope="module")
def backend(server) -> sgl.RuntimeEndpoint:
    return sgl.RuntimeEndpoint(server.url)


class TraceParser(html.parser.HTMLParser):
    """Rows (`data-kind`), forks, branches, totals blocks, and the numbers shown (`data-field`)
    inside the row or totals block opened last."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.forks: list[dict[str, Any]] = []
        self.branches: list[str] = []
        self.branch_heads: list[dict[str, Any]] = []
        self.joins: list[dict[str, Any]] = []
        self.totals: list[dict[str, Any]] = []
        self.programs: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._block: dict[str, Any] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if "data-kind" in a:
            self._block = {**a, "shown": {}}
            self.calls.append(self._block)
        elif "totals" in cls or "program-totals" in cls:
            self._block = {**a, "shown": {}}
            self.totals.append(self._block)
        elif "fork" in cls:
            self.forks.append(a)
        elif "branch" in cls:
            self.branches.append(a["data-branch"])
        elif "fork-join" in cls:
            self.joins.append(a)
        elif "head" in cls and "data-calls" in a:
            self.branch_heads.append(a)
        elif tag == "section" and "data-program" in a:
            self.programs.append(a)
        if "data-field" in a:
            self._field = a["data-field"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._field is not None and self._block is not None:
            self._block["shown"][self._field] = data
            self._field = None


def parse(page: str) -> TraceParser:
    parser = TraceParser()
    parser.feed(page)
    parser.close()
    return parser


@sgl.function
def planner(s, note: str):
    s += "Notes: " + note + "\n"
    s += "Question: what next?\nAnswer:" + sgl.gen("first", max_tokens=6, temperature=0) + "\n"
    s += "Colour: " + sgl.select("pick", ["red", "green", "blue"]) + "\n"
    forks = s.fork(2)
    for i, branch in enumerate(forks):
        branch += f"Idea {i}:" + sgl.gen("idea", max_tokens=5, temperature=0)
    forks.join()
    s += "\nSo:" + sgl.gen("last", max_tokens=4, temperature=0)


def check_numbers(call: dict[str, Any], meta: dict[str, Any]) -> None:
    for field in FIELDS:
        expected = int(meta.get(field.replace("-", "_"), 0))
        assert int(call[f"data-{field}"]) == expected, (field, call, meta)
        assert int(call["shown"][field]) == expected, (field, call, meta)


def test_state_trace_matches_meta_info_and_fork_tree(backend, tmp_path: pathlib.Path) -> None:
    state = planner.run(note=NOTE, backend=backend)
    assert state.error() is None, state.error()
    path = state.trace(title="planner <run>").save(tmp_path / "run.html")
    page = path.read_text()
    got = parse(page)

    # The calls in program order: gen, select, the fork's prefix commit, one gen per branch, gen.
    assert [(c["data-kind"], c["data-name"], c["data-branch"]) for c in got.calls] == [
        ("gen", "first", ""), ("select", "pick", ""), ("commit", "", ""), ("gen", "idea", "0"), ("gen", "idea", "1"),
        ("gen", "last", ""),
    ]  # fmt: skip
    by_key = {(c["data-name"], c["data-branch"]): c for c in got.calls}
    for name in ("first", "pick", "last"):
        check_numbers(by_key[(name, "")], state.get_meta_info(name))
    for i, meta in enumerate(state.get_meta_info("idea")["forks"]):
        check_numbers(by_key[("idea", str(i))], meta)
    assert int(by_key[("pick", "")]["data-completion-tokens"]) == 0
    # The fork committed the shared prefix first, so each branch found it in the cache.
    for i in range(2):
        assert int(by_key[("idea", str(i))]["data-cached-tokens"]) > 0

    # The tree: one fork of two branches, the branches' rows inside them.
    assert [f["data-size"] for f in got.forks] == ["2"]
    assert got.branches == ["0", "1"]

    # One time axis: every call starts before it ends, in program order, within the run's wall time.
    totals = got.totals[0]
    wall = float(totals["data-wall-ms"])
    for call in got.calls:
        assert 0 <= float(call["data-start-ms"]) <= float(call["data-end-ms"]) <= wall + 1e-6
    assert float(by_key[("first", "")]["data-end-ms"]) <= float(by_key[("pick", "")]["data-start-ms"])
    assert float(by_key[("idea", "1")]["data-end-ms"]) <= float(by_key[("last", "")]["data-start-ms"])

    # Totals at the top add up the rows.
    assert int(totals["data-calls"]) == len(got.calls) == int(totals["shown"]["calls"])
    for field in FIELDS:
        assert int(totals[f"data-{field}"]) == sum(int(c[f"data-{field}"]) for c in got.calls)
    assert float(totals["data-cached-fraction"]) == pytest.approx(
        int(totals["data-cached-tokens"]) / int(totals["data-prompt-tokens"]), abs=1e-4)

    # Text from the program is escaped, never markup; the page is self-contained.
    assert "<script" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "planner &lt;run&gt;" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page

    # SGLang's Program.trace (the expressions, without running) is untouched.
    nodes = classify.trace(review="Bo")
    assert type(nodes[-1]).__name__ == "Select" and nodes[-1].name == "label"


@sgl.function
def trip(s):
    s += "Plan a short trip with friends. " * 3 + "Options:\n"
    forks = s.fork(2)
    forks += lambda i: f"Option {i}:" + sgl.gen("opt", max_tokens=4, temperature=0, ignore_eos=True) + "\n"
    forks[0] += "Rating:" + sgl.select("rate", [" good", " bad"])
    inner = forks[1].fork(2)  # a fork inside a branch
    inner += lambda j: f"Detail {j}:" + sgl.gen("detail", max_tokens=3, temperature=0, ignore_eos=True)
    inner.join()
    forks.join("concate_and_append")
    s += "\nBest:" + sgl.gen("best", max_tokens=3, temperature=0, ignore_eos=True)
    return forks, inner


def test_trace_follows_forks_into_each_branch(backend) -> None:
    """Each branch's gen/select rows (a nested fork included) carry that branch's own meta_info;
    branch heads sum their rows; joins sit where the branches came back."""
    sgl.flush_cache(backend)
    state = trip.run(backend=backend)
    assert state.error() is None, state.error()
    forks, inner = state.ret_value
    got = parse(state.trace().to_html())

    assert [(c["data-kind"], c["data-name"], c["data-branch"]) for c in got.calls] == [
        ("commit", "", ""),
        ("gen", "opt", "0"), ("select", "rate", "0"), ("join", "", "0"),
        ("gen", "opt", "1"), ("commit", "", "1"), ("gen", "detail", "1.0"), ("gen", "detail", "1.1"),
        ("gen", "best", ""),
    ]  # fmt: skip
    assert got.branches == ["0", "1", "1.0", "1.1"]
    assert [f["data-size"] for f in got.forks] == ["2", "2"]
    assert [(j["data-mode"], j["data-size"]) for j in got.joins] == [("gather_variable", "2"), ("concate_and_append", "2")]

    by_key = {(c["data-name"], c["data-branch"]): c for c in got.calls if c["data-name"]}
    for i, branch in enumerate(forks):
        check_numbers(by_key[("opt", str(i))], branch.get_meta_info("opt"))
    check_numbers(by_key[("rate", "0")], forks[0].get_meta_info("rate"))
    for j, branch in enumerate(inner):
        check_numbers(by_key[("detail", f"1.{j}")], branch.get_meta_info("detail"))
    check_numbers(by_key[("best", "")], state.get_meta_info("best"))
    # Every branch's first request found the prefix its fork committed in the cache.
    commits = [c for c in got.calls if c["data-kind"] == "commit"]
    assert int(by_key[("opt", "0")]["data-cached-tokens"]) >= int(commits[0]["data-prompt-tokens"]) - 1
    assert int(by_key[("detail", "1.0")]["data-cached-tokens"]) >= int(commits[1]["data-prompt-tokens"]) - 1
    # After concate_and_append the parent's gen reused branch 0's whole text (its join prefill).
    (join_commit,) = [c for c in got.calls if c["data-kind"] == "join"]
    assert int(by_key[("best", "")]["data-cached-tokens"]) >= int(join_commit["data-prompt-tokens"]) - 1

    # A branch head sums the rows of the branch and of the branches inside it; its wall time
    # covers each of them.
    assert len(got.branch_heads) == 4
    for bid, head in zip(got.branches, got.branch_heads):
        rows = [c for c in got.calls if c["data-branch"] == bid or c["data-branch"].startswith(bid + ".")]
        assert int(head["data-calls"]) == len(rows)
        for field in FIELDS:
            assert int(head[f"data-{field}"]) == sum(int(c[f"data-{field}"]) for c in rows), (bid, field)
        for c in rows:
            assert float(head["data-wall-ms"]) >= float(c["data-end-ms"]) - float(c["data-start-ms"]) - 1e-3
    # The joins come after every row of their branches, and before what the parent does next.
    inner_join, outer_join = (float(j["data-at-ms"]) for j in got.joins)
    assert all(float(by_key[("detail", f"1.{j}")]["data-end-ms"]) <= inner_join for j in range(2))
    assert all(float(c["data-end-ms"]) <= outer_join for c in got.calls if c["data-branch"])
    assert outer_join <= float(by_key[("best", "")]["data-start-ms"])


@sgl.function
def classify(s, review: str):
    s += "Reviews and their sentiment, one per line, in a long shared preamble.\n" * 3
    s += f"Review: {review}\nSentiment:" + sgl.select("label", [" positive", " negative"])


def test_run_batch_trace_stacks_programs_with_batch_totals(backend) -> None:
    reviews = ["Great coffee.", "Cold soup <again>.", "Lovely walk."]
    states = classify.run_batch([{"review": r} for r in reviews], backend=backend, num_threads=3)
    assert all(s.error() is None for s in states), [s.error() for s in states]
    got = parse(RunTrace.of(states).to_html())

    assert [p["data-program"] for p in got.programs] == ["0", "1", "2"]
    selects = [c for c in got.calls if c["data-kind"] == "select"]
    assert [c["data-program"] for c in selects] == ["0", "1", "2"]
    for call, state in zip(selects, states):
        check_numbers(call, state.get_meta_info("label"))
    # The batch warmed its shared prefix once: one row for it, and the selects hit the cache.
    warm = [c for c in got.calls if c["data-kind"] == "warm"]
    assert len(warm) == 1 and int(warm[0]["data-prompt-tokens"]) > 0
    assert all(int(c["data-cached-tokens"]) > 0 for c in selects)

    batch, *per_program = got.totals
    assert len(per_program) == 3
    assert int(batch["data-calls"]) == 4
    for field in FIELDS:
        assert int(batch[f"data-{field}"]) == sum(int(c[f"data-{field}"]) for c in got.calls)
    for totals, call in zip(per_program, selects):
        assert int(totals["data-prompt-tokens"]) == int(call["data-prompt-tokens"])
    assert float(batch["data-wall-ms"]) >= max(float(t["data-wall-ms"]) for t in per_program)
    # Each row's tooltip ends with the prompt it answered (escaped in the page; the parser unescapes it).
    assert "Cold soup <again>.\nSentiment:" in selects[1]["title"]


def test_trace_of_rejects_what_is_not_a_state() -> None:
    with pytest.raises(TypeError, match="program states"):
        RunTrace.of(["not a state"])


def test_nested_forks_render_from_hand_made_records() -> None:
    """Without a server: a branch that forks again shows as branch 1 -> branches 1.0 and 1.1."""
    from loom.lang.run_trace import CallRecord, Node

    def call(name: str, branch: tuple[int, ...], t: float) -> CallRecord:
        return CallRecord("gen", name, branch, 10, 4, 2, t, t + 0.5, "<p>", "out")

    inner = [Node((1, j), [call(f"leaf{j}", (1, j), 2.0 + j)], 2.0, 3.5 + j) for j in range(2)]
    outer = [Node((0,), [call("a", (0,), 1.0)], 1.0, 1.5), Node((1,), [call("b", (1,), 1.0), inner], 1.0, 4.5)]
    root = Node((), [call("root", (), 0.0), outer], 0.0, 4.5)
    got = parse(RunTrace([root], []).to_html())

    assert [(c["data-name"], c["data-branch"]) for c in got.calls] == [
        ("root", ""), ("a", "0"), ("b", "1"), ("leaf0", "1.0"), ("leaf1", "1.1")]
    assert got.branches == ["0", "1", "1.0", "1.1"]
    assert [f["data-size"] for f in got.forks] == ["2", "2"]
    assert [c["data-start-ms"] for c in got.calls] == ["0.0", "1000.0", "1000.0", "2000.0", "3000.0"]
    totals = got.totals[0]
    assert (totals["data-calls"], totals["data-prompt-tokens"], totals["data-cached-fraction"]) == ("5", "50", "0.4000")
    assert totals["data-wall-ms"] == "4500.000"
    assert parse(RunTrace([Node(())], []).to_html()).totals[0]["data-cached-fraction"] == "0.0000"  # no calls
