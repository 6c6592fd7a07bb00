"""EBNF grammars (GBNF, or Lark's own syntax) as per-request token masks, on Lark's LALR tables.

    compile_grammar(kind, source, vocab) -> CompiledEbnf  ->  .matcher() -> EbnfGrammar per request

A position is a set of configurations (LALR stack, lexer state): the stack is Lark's LALR(1)
parser state stack (interned, so a configuration is one int), the lexer state is a byte DFA
state of the terminal being read. Lexing is nondeterministic: a lexeme may end wherever its
terminal accepts, and the next one starts on the same byte, so a token can close one terminal
and open the next, overlapping terminals are all tried, and the language is the grammar's own
(what Earley with a complete dynamic lexer accepts), not a longest-match lexer's subset.

A mask is computed without re-lexing each token: per lexer state (grammar-wide, once) one walk
of the vocabulary's byte trie against the terminal's automaton (C, token_walk.trie_scan; a
vectorised numpy pass where there is no compiler) gives the tokens that stay inside the lexeme,
which need no parser, and per offset j the few that may end it after j bytes. Only those cross a
lexeme end: their remainders are walked against the parser, and each token's verdict is kept per
(offset, stack), as it depends on nothing else. Masks are cached per position, so a state seen
before costs one copy.
"""

from __future__ import annotations

import lark
import numpy as np
import torch

from loom.runtime.constrained.bitmask import bitmask_width
from loom.runtime.constrained.dfa import ByteDFA, terminal_dfa
from loom.runtime.constrained.ebnf_gbnf import gbnf_to_lark
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.matcher import TokenMatcher
from loom.runtime.constrained.token_walk import available as walk_available
from loom.runtime.constrained.token_walk import token_trie, trie_scan
from loom.runtime.constrained.vocabulary import TokenVocab

EBNF_KINDS = ("ebnf", "lark")
MAX_CONFIGS = 512  # a position with more (stack, lexer) configurations keeps the first ones: sound, maybe incomplete
MAX_FORCED = 256  # forced_bytes stops after this many (a grammar may force an endless string)
_MANY = 2048  # _crossing walks more tokens than this by lexer-state scans (_accepted_after)
_FEW = 64  # _accepted_from walks this many tokens or fewer one by one
_CACHE_LIMIT = 200_000  # memo entries before a memo is cleared (positions are recomputed on demand)
MASK_CACHE_BYTES = 64 << 20  # a grammar's packed masks past this are dropped (recomputed on demand)

# Lark's common.lark spells ESCAPED_STRING with a look-behind, which has no automaton; this is
# the same set of lexemes: quoted, no raw newline, every backslash escapes the next character.
_EQUIVALENT_PATTERNS = {r'".*?(?<!\\)(\\\\)*?"': r'"(?:[^"\\\n]|\\[^\n])*"'}


def _build_lark(source: str, start: str, kind: str, rule_names: dict[str, str]) -> lark.Lark:
    try:
        return lark.Lark(source, parser="lalr", lexer="basic", start=start)
    except lark.exceptions.LarkError as e:
        msg = str(e)
        for lark_name, name in sorted(rule_names.items(), key=lambda kv: -len(kv[0])):
            msg = msg.replace(lark_name, name)
        if "Reduce/Reduce collision" in msg:
            msg += "\n(the grammar must be LALR(1) once its regular rules are folded into terminals; make the alternatives differ earlier)"
        raise GrammarError(f"{kind} grammar: {msg.strip()}") from None


_BITS = np.arange(32, dtype=np.uint32)


def _unpack_few(words: np.ndarray) -> np.ndarray:
    """Packed words -> the token ids set in them (a sparse mask: only its non-zero words are read)."""
    w = np.flatnonzero(words)
    hit = (words[w, None] >> _BITS) & 1  # [k, 32]
    return (w[:, None] * 32 + _BITS)[hit.astype(bool)].astype(np.int64)


def _pack_few(ids: np.ndarray, width: int) -> np.ndarray:
    """Token ids -> packed words [width] uint32 (a few ids: no vocabulary-sized buffer)."""
    out = np.zeros(width, dtype=np.uint32)
    if len(ids):
        ids = np.sort(ids)
        word = ids >> 5
        starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))  # first id of each word
        out[word[starts]] = np.bitwise_or.reduceat(np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)), starts)
    return out


class CompiledEbnf:
    """A grammar's LALR table, terminal automata and caches, shared by every request using it.

    Masks and memos are filled lazily from the scheduler's thread (the one thread that steps
    requests); compilation itself runs on a backend worker."""

    def __init__(
        self,
        source: str,
        start: str,
        vocab: TokenVocab,
        kind: str = "lark",
        rule_names: dict[str, str] | None = None,
        terminal_dfas: dict[str, ByteDFA] | None = None,
    ) -> None:
        """terminal_dfas: automata to use instead of the named terminals' regexes (languages a regex
        cannot spell, such as JSON-Schema keys matching no pattern); the regex stays Lark's."""
        self.kind = kind
        self.lark_source = source
        self.start = start
        self.vocab = vocab
        parser = _build_lark(source, start, kind, rule_names or {})
        table = parser.parser.parser.parser.parse_table
        self._lark = parser

        # terminals -> byte DFAs; lexer states get grammar-wide ids (one config = stack * n + lexer id)
        self.terminal_names = [t.name for t in parser.terminals]
        index = {name: k for k, name in enumerate(self.terminal_names)}
        self.ignored = frozenset(index[n] for n in parser.ignore_tokens)
        self.dfas: list[ByteDFA] = []
        for t in parser.terminals:
            pattern = t.pattern.to_regexp()
            dfa = (terminal_dfas or {}).get(t.name) or terminal_dfa(
                _EQUIVALENT_PATTERNS.get(pattern, pattern), f"{kind} grammar: terminal {t.name}"
            )
            if dfa.accepting[0]:
                raise GrammarError(
                    f"{kind} grammar: terminal {t.name} (/{pattern}/) matches the empty string; terminals must match at least one character"
                )
            if dfa.dead == 0:
                raise GrammarError(f"{kind} grammar: terminal {t.name} (/{pattern}/) matches nothing")
            self.dfas.append(dfa)
        self.offsets: list[int] = []
        self.trans: list[list[int]] = []  # lexer id -> 256 next lexer ids (-1: dead)
        self.accepting: list[bool] = []
        self.lex_terminal: list[int] = []
        self.first_bytes: list[frozenset[int]] = []
        for k, dfa in enumerate(self.dfas):
            base = len(self.trans)
            self.offsets.append(base)
            for q in range(dfa.dead):
                row = [int(x) + base if x != dfa.dead else -1 for x in dfa.table[q]]
                self.trans.append(row)
                self.accepting.append(bool(dfa.accepting[q]))
                self.lex_terminal.append(k)
                self.first_bytes.append(frozenset(b for b in range(256) if row[b] >= 0))
        self.boundary = len(self.trans)  # "between lexemes": only at the very start
        self.n_lex = self.boundary + 1

        # the LALR table: per state, terminal index -> ("shift", state) / ("reduce", (nonterminal, size))
        self._end = len(self.terminal_names)
        self._actions: dict[int, dict[int, tuple[bool, object]]] = {}
        self._goto: dict[int, dict[str, int]] = {}
        for state, acts in table.states.items():
            a: dict[int, tuple[bool, object]] = {}
            g: dict[str, int] = {}
            for sym, (action, arg) in acts.items():
                is_shift = action.name == "Shift"
                if sym == "$END":
                    a[self._end] = (is_shift, arg if is_shift else (arg.origin.name, len(arg.expansion)))
                elif sym in index:
                    a[index[sym]] = (is_shift, arg if is_shift else (arg.origin.name, len(arg.expansion)))
                else:
                    g[sym] = arg
            self._actions[state] = a
            self._goto[state] = g
        self._end_state = table.end_states[start]

        # interned stacks: id -> (top state, parent id)
        self._top: list[int] = [table.start_states[start]]
        self._parent: list[int] = [-1]
        self._interned: dict[tuple[int, int], int] = {}

        self._after: dict[tuple[int, int], int | None] = {}
        self._startable: dict[int, tuple[int, ...]] = {}
        self._can_end: dict[int, bool] = {}
        self._step1: dict[int, tuple[int, ...]] = {}
        self._step: dict[tuple[frozenset[int], int], frozenset[int]] = {}
        self._inside: dict[int, np.ndarray] = {}
        self._splits: dict[int, dict[int, np.ndarray]] = {}
        self._crossed: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (offset, stack) -> (checked, allowed)
        self._offset_scans: dict[tuple[int, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        self._rests: dict[tuple[int, int], np.ndarray] = {}
        self._sets: list[frozenset[int]] = []  # configurations interned for _accepted_from's vectorised walk
        self._set_of: dict[frozenset[int], int] = {}
        self._set_step: dict[int, int] = {}
        self._verdicts: dict[tuple[int, int, int], bool] = {}  # (interned configurations, token, position) -> accepted
        self._word_cache: dict[frozenset[int], np.ndarray] = {}
        self._eos_words = vocab.pack(sorted(t for t in vocab.eos_token_ids if t < vocab.vocab_size))
        self._masks: dict[frozenset[int], tuple[torch.Tensor, bool]] = {}
        self._forced: dict[frozenset[int], bytes] = {}
        self.initial: frozenset[int] = frozenset({0 * self.n_lex + self.boundary})
        if not self.startable(0) and not self.stack_can_end(0):
            raise GrammarError(f"{kind} grammar: the start rule {start!r} matches nothing", ErrorKind.EMPTY)

    def matcher(self) -> EbnfGrammar:
        return EbnfGrammar(self)

    def _mask_count(self) -> int:
        return (len(self._inside) + sum(len(s) for s in self._splits.values()) + 2 * len(self._crossed)
                + sum(1 + len(s) for _, s in self._offset_scans.values()) + len(self._rests)
                + len(self._word_cache) + len(self._masks))  # fmt: skip

    @property
    def nbytes(self) -> int:
        """What this compiled grammar holds, roughly: its lexer table and the masks computed so far."""
        return len(self.trans) * 256 * 8 + self._mask_count() * self._eos_words.nbytes

    def _bound_masks(self) -> None:
        """Drop every cached mask once they pass MASK_CACHE_BYTES (recomputed as positions are visited)."""
        if self._mask_count() * self._eos_words.nbytes > MASK_CACHE_BYTES:
            for memo in (self._inside, self._splits, self._crossed, self._offset_scans, self._rests, self._word_cache, self._masks):
                memo.clear()

    # ------------------------------------------------------------------ the parser
    def _push(self, parent: int, state: int) -> int:
        key = (parent, state)
        sid = self._interned.get(key)
        if sid is None:
            sid = self._interned[key] = len(self._top)
            self._top.append(state)
            self._parent.append(parent)
        return sid

    def _feed(self, sid: int, terminal: int) -> int | None:
        """The stack after shifting `terminal` (reducing first as LALR does); None: not acceptable.
        For the end marker, returns the stack on acceptance (reduced to the end state)."""
        while True:
            act = self._actions[self._top[sid]].get(terminal)
            if act is None:
                return None
            is_shift, arg = act
            if is_shift:
                return self._push(sid, arg)  # type: ignore[arg-type]
            origin, size = arg  # type: ignore[misc]
            for _ in range(size):
                sid = self._parent[sid]
            sid = self._push(sid, self._goto[self._top[sid]][origin])
            if terminal == self._end and self._top[sid] == self._end_state:
                return sid

    def after(self, sid: int, terminal: int) -> int | None:
        """The stack once a lexeme of `terminal` is complete (ignored terminals leave it as is)."""
        if terminal in self.ignored:
            return sid
        key = (sid, terminal)
        if key not in self._after:
            self._after[key] = self._feed(sid, terminal)
        return self._after[key]

    def startable(self, sid: int) -> tuple[int, ...]:
        """Terminals a new lexeme may be of at this stack: shiftable ones plus the ignored."""
        out = self._startable.get(sid)
        if out is None:
            acts = self._actions[self._top[sid]]
            out = tuple(sorted({t for t in acts if t != self._end and self.after(sid, t) is not None} | self.ignored))
            self._startable[sid] = out
        return out

    def stack_can_end(self, sid: int) -> bool:
        if sid not in self._can_end:
            self._can_end[sid] = self._feed(sid, self._end) is not None
        return self._can_end[sid]

    # ------------------------------------------------------------------ the lexer over bytes
    def _step_one(self, config: int, byte: int) -> tuple[int, ...]:
        key = config * 256 + byte
        out = self._step1.get(key)
        if out is not None:
            return out
        sid, lex = divmod(config, self.n_lex)
        res: list[int] = []
        if lex == self.boundary:
            starts: int | None = sid
        else:
            nxt = self.trans[lex][byte]
            if nxt >= 0:
                res.append(sid * self.n_lex + nxt)
            starts = self.after(sid, self.lex_terminal[lex]) if self.accepting[lex] else None
        if starts is not None:
            base = starts * self.n_lex
            for t in self.startable(starts):
                nxt = self.trans[self.offsets[t]][byte]
                if nxt >= 0:
                    res.append(base + nxt)
        out = self._step1[key] = tuple(res)
        return out

    def step(self, configs: frozenset[int], byte: int) -> frozenset[int]:
        key = (configs, byte)
        out = self._step.get(key)
        if out is None:
            if len(self._step) > _CACHE_LIMIT:
                self._step.clear()
                self._step1.clear()
            found: set[int] = set()
            for c in configs:
                found.update(self._step_one(c, byte))
            if len(found) > MAX_CONFIGS:
                found = set(sorted(found)[:MAX_CONFIGS])
            out = self._step[key] = frozenset(found)
        return out

    def walk(self, configs: frozenset[int], data: bytes) -> frozenset[int]:
        for b in data:
            configs = self.step(configs, b)
            if not configs:
                break
        return configs

    def can_end(self, configs: frozenset[int]) -> bool:
        for c in configs:
            sid, lex = divmod(c, self.n_lex)
            if lex == self.boundary:
                if self.stack_can_end(sid):
                    return True
            elif self.accepting[lex]:
                after = self.after(sid, self.lex_terminal[lex])
                if after is not None and self.stack_can_end(after):
                    return True
        return False

    def _lexemes(self, config: int) -> tuple[int, list[int]]:
        """(stack, the lexer ids a configuration stands for: itself, or every lexeme that may start)."""
        sid, lex = divmod(config, self.n_lex)
        if lex == self.boundary:
            return sid, [self.offsets[t] for t in self.startable(sid)]
        return sid, [lex]

    # ------------------------------------------------------------------ masks
    def _scan(self, lex: int) -> None:
        """The tokens that stay inside the lexeme from lexer state `lex`, and per offset j >= 1 the
        tokens that may end it after their first j bytes (packed masks)."""
        self._inside[lex], self._splits[lex] = self._scan_at(lex, 0)

    def _scan_at(self, lex: int, offset: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """`_scan` of the lexeme entered after each token's first `offset` bytes (tokens longer
        than that): a C walk of the token trie, or (no compiler) one vectorised pass of the
        vocabulary through the lexeme's DFA. Offsets past 0 are cached here."""
        if offset:
            hit = self._offset_scans.get((lex, offset))
            if hit is not None:
                return hit
        v = self.vocab
        k = self.lex_terminal[lex]
        dfa = self.dfas[k]
        scanned = trie_scan(token_trie(v), dfa.table, dfa.accepting, lex - self.offsets[k], offset) if walk_available() else None
        if scanned is None:
            idx = np.flatnonzero(v.lens > offset)
            st = np.full(len(idx), lex - self.offsets[k], dtype=np.int32)  # [n] DFA states
            inside: list[np.ndarray] = []
            splits: dict[int, np.ndarray] = {}
            for j in range(offset, v.data.shape[1] + 1):
                done = v.lens[idx] == j
                if done.any():
                    inside.append(idx[done])
                    keep = ~done
                    idx, st = idx[keep], st[keep]
                if not len(idx):
                    break
                if j > offset:  # ending where it starts is the boundary's own mask (see _words)
                    hit = dfa.accepting[st]
                    if hit.any():
                        splits[j] = v.pack(v.ids[idx[hit]])
                st = dfa.table[st, v.data[idx, j]]
                live = st != dfa.dead
                idx, st = idx[live], st[live]
            scanned = (v.pack(v.ids[np.concatenate(inside)] if inside else []), splits)
        if offset:
            self._offset_scans[(lex, offset)] = scanned
        return scanned

    def _accepted_after(self, offset: int, sid: int) -> np.ndarray:
        """Packed: the tokens longer than `offset` whose bytes from `offset` on are accepted from a
        lexeme boundary at stack `sid` (`_words`' decomposition, entered `offset` bytes into the
        tokens: the per-lexer-state scans are shared by every stack, the parser steps once per
        lexeme end). For many tokens at once, where walking each costs more."""
        key = (offset, sid)
        words = self._rests.get(key)
        if words is None:
            words = np.zeros(bitmask_width(self.vocab.vocab_size), dtype=np.uint32)
            for t in self.startable(sid):
                inside, splits = self._scan_at(self.offsets[t], offset)
                words |= inside
                after = self.after(sid, t) if splits else None
                if after is not None:
                    for j, enders in splits.items():
                        words |= self._crossing(j, after, enders)
            self._rests[key] = words
        return words

    def _crossing(self, offset: int, sid: int, enders: np.ndarray) -> np.ndarray:
        """The tokens of `enders` (packed) whose bytes from `offset` on are accepted from a lexeme
        boundary at stack `sid`. A token's verdict depends on nothing else, so each is checked once
        per (offset, stack)."""
        key = (offset, sid)
        memo = self._crossed.get(key)
        if memo is None:
            zeros = np.zeros_like(enders)
            memo = self._crossed[key] = (zeros, zeros.copy())
        checked, allowed = memo
        new = enders & ~checked
        if int(np.bitwise_count(new).sum()) > _MANY:  # a lexeme ending inside most tokens (a string's chunks)
            allowed[:] = self._accepted_after(offset, sid)
            checked[:] = np.uint32(0xFFFFFFFF)
        elif new.any():
            allowed |= _pack_few(self._accepted_from(offset, sid, _unpack_few(new)), len(allowed))
            checked |= new
        return allowed & enders

    def _accepted_from(self, offset: int, sid: int, ids: np.ndarray) -> np.ndarray:
        """The token ids of `ids` whose bytes from `offset` on are accepted from a lexeme boundary at
        stack `sid`: the tokens walked together byte position by byte position, one parser step
        per distinct (configurations, byte) at each position, as a walk of their trie would."""
        v = self.vocab
        if len(self._set_of) > _CACHE_LIMIT or len(self._verdicts) > 4 * _CACHE_LIMIT:
            self._set_of.clear(), self._sets.clear(), self._set_step.clear(), self._verdicts.clear()
        rows = np.searchsorted(v.ids, ids)  # [n] rows of the vocabulary matrix
        left = v.lens[rows] - offset  # [n] bytes still to walk
        st = np.full(len(rows), self._set_id(frozenset({sid * self.n_lex + self.boundary})), dtype=np.int64)
        found: list[np.ndarray] = []
        for j in range(offset, v.data.shape[1] + 1):
            done = left == j - offset
            if done.any():
                found.append(ids[done])
                keep = ~done
                ids, rows, left, st = ids[keep], rows[keep], left[keep], st[keep]
            if len(ids) <= _FEW:  # the vectorised step costs more than walking these one by one
                found.append(np.asarray(self._walk_each(ids, st, j), dtype=np.int64))
                break
            uniq, inv = np.unique(st * 256 + v.data[rows, j], return_inverse=True)
            st = np.array([self._next_set(int(k)) for k in uniq], dtype=np.int64)[inv]
            live = st >= 0
            ids, rows, left, st = ids[live], rows[live], left[live], st[live]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _walk_each(self, ids: np.ndarray, sets: np.ndarray, j: int) -> list[int]:
        """The token ids of `ids` whose bytes from `j` on lead their interned configurations `sets` to
        some. Verdicts are kept per (configurations, token, position): a token crossing several
        lexeme ends (a run of whitespace) is checked at each, and its walks meet again."""
        found: list[int] = []
        memo = self._verdicts
        for t, s in zip(ids.tolist(), sets.tolist()):
            data = self.vocab.by_id[t]
            path: list[tuple[int, int, int]] = []
            ok = True
            for p in range(j, len(data)):
                key = (s, t, p)
                known = memo.get(key)
                if known is not None:
                    ok = known
                    break
                path.append(key)
                s = self._next_set(s * 256 + data[p])
                if s < 0:
                    ok = False
                    break
            for key in path:
                memo[key] = ok
            if ok:
                found.append(t)
        return found

    def _set_id(self, configs: frozenset[int]) -> int:
        out = self._set_of.get(configs)
        if out is None:
            out = self._set_of[configs] = len(self._sets)
            self._sets.append(configs)
        return out

    def _next_set(self, key: int) -> int:
        """Interned configurations `key // 256` stepped by byte `key % 256` (-1: none left)."""
        out = self._set_step.get(key)
        if out is None:
            nxt = self.step(self._sets[key >> 8], key & 255)
            out = self._set_step[key] = self._set_id(nxt) if nxt else -1
        return out

    def _words(self, configs: frozenset[int]) -> np.ndarray:
        """Packed non-EOS tokens allowed from `configs` (cached).

        A token either stays inside a lexeme (the scanned `inside` mask), or ends it after j bytes
        and the rest starts at a boundary at the stack after it: j == 0 is the boundary's own
        mask (recursion; a lexeme's start states never accept), j >= 1 walks the remainders of
        the tokens that may end it there (`_crossing`)."""
        words = self._word_cache.get(configs)
        if words is not None:
            return words
        words = np.zeros(bitmask_width(self.vocab.vocab_size), dtype=np.uint32)
        for c in configs:
            sid, lexes = self._lexemes(c)
            for lex in lexes:
                if lex not in self._inside:
                    self._scan(lex)
                words |= self._inside[lex]
                splits = self._splits[lex]
                if not splits and not self.accepting[lex]:
                    continue
                after = self.after(sid, self.lex_terminal[lex])
                if after is None:
                    continue
                if self.accepting[lex]:
                    words |= self._words(frozenset({after * self.n_lex + self.boundary}))
                for j, enders in splits.items():
                    words |= self._crossing(j, after, enders)
        if len(self._word_cache) > _CACHE_LIMIT // 100:
            self._word_cache.clear()
        self._word_cache[configs] = words
        return words

    def mask(self, configs: frozenset[int]) -> tuple[torch.Tensor, bool]:
        """-> (packed mask [ceil(V / 32)] int32, whether any non-EOS token is allowed)."""
        hit = self._masks.get(configs)
        if hit is not None:
            return hit
        self._bound_masks()
        words = self._words(configs)
        more = bool(words.any())
        if self.can_end(configs):
            words = words | self._eos_words
        if len(self._masks) > _CACHE_LIMIT // 100:
            self._masks.clear()
        entry = self._masks[configs] = (torch.from_numpy(words.view(np.int32)), more)
        return entry

    def next_bytes(self, configs: frozenset[int]) -> frozenset[int]:
        found: set[int] = set()
        for c in configs:
            sid, lexes = self._lexemes(c)
            for lex in lexes:
                found |= self.first_bytes[lex]
                if self.accepting[lex] and c % self.n_lex != self.boundary:
                    after = self.after(sid, self.lex_terminal[lex])
                    if after is not None:
                        for t in self.startable(after):
                            found |= self.first_bytes[self.offsets[t]]
        return frozenset(found)

    def forced_bytes(self, configs: frozenset[int]) -> bytes:
        out = self._forced.get(configs)
        if out is None:
            buf = bytearray()
            cur = configs
            while len(buf) < MAX_FORCED and cur and not self.can_end(cur):
                nxt = self.next_bytes(cur)
                if len(nxt) != 1:
                    break
                (b,) = nxt
                buf.append(b)
                cur = self.step(cur, b)
            out = self._forced[configs] = bytes(buf)
        return out


class EbnfGrammar(TokenMatcher):
    """One request's position in a compiled EBNF grammar (the matcher of matcher.TokenMatcher, as
    RegexGrammar): a state is a set of configurations; it may end where the grammar may."""

    compiled: CompiledEbnf

    def __init__(self, compiled: CompiledEbnf) -> None:
        super().__init__(compiled, compiled.initial, compiled.vocab.eos_token_ids)

    def _next(self, state: frozenset[int], token_id: int) -> frozenset[int] | None:
        data = self.compiled.vocab.by_id.get(token_id)
        if data is None:
            return None
        return self.compiled.walk(state, data) or None

    def _can_end(self, state: frozenset[int]) -> bool:
        return self.compiled.can_end(state)


def compile_grammar(kind: str, source: str, vocab: TokenVocab, terminal_dfas: dict[str, ByteDFA] | None = None) -> CompiledEbnf:
    """kind "ebnf" (GBNF, start rule `root`) or "lark" (Lark syntax, start rule `start`).
    Raises GrammarError naming the line or rule and what was expected."""
    if kind == "ebnf":
        tr = gbnf_to_lark(source)
        compiled = CompiledEbnf(tr.source, tr.start, vocab, "ebnf", tr.rule_names)
    elif kind == "lark":
        compiled = CompiledEbnf(source, "start", vocab, "lark", terminal_dfas=terminal_dfas)
    else:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {EBNF_KINDS}")
    # Warm up here, on the compiling thread, not the scheduler's: the vocabulary's trie (once per
    # vocabulary) and the first mask.
    if walk_available():
        token_trie(vocab)
    compiled.mask(compiled.initial)
    return compiled
