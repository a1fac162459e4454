"""An offline multi-hop question-answering environment for agents: ``kb_agent?size=100&seed=1&difficulty=2``.

Each suite builds a small made-up *knowledge base* (:class:`KnowledgeBase`) from its seed: people,
cities and companies with pronounceable invented names (syllables drawn from a seeded
``random.Random``; no external data) and a few relations each:

- person: ``born_in`` → city, ``works_for`` → company, ``age`` → int;
- city: ``population`` → int, ``country`` → invented country name, ``mayor`` → person;
- company: ``ceo`` → person, ``headquartered_in`` → city, ``founded`` → year.

Questions (:func:`make_question`) follow a chain of 2 to 4 relations ("How old is the mayor of the
city where the CEO of Tralix Corp was born?" is ``ceo`` → ``born_in`` → ``mayor`` → ``age``); some
follow two chains and end in arithmetic ("How many years older is the CEO of X than the mayor of
Y?"), which the ``calculator`` tool does.  Every name is unique and every relation is defined, so
each question has one answer.  Items carry two tools: ``search`` (:meth:`KnowledgeBase.search`, an
entity's facts by name) and ``calculator`` (:func:`calculator`, safe arithmetic).
:func:`scripted_solve` answers an item by calling those tools only, which shows every item is
solvable from tool observations alone.

Difficulty 1, 2 and 3 mean 2, 3 and 4 hops; ``mixed`` cycles through them.  Numeric answers are
graded numerically, names by normalised string equality.  Items are a pure function of the
constructor arguments.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from budgetlm.errors import ConfigError, invalid
from budgetlm.evals import graders as _graders  # module import: graders imports suites.base (a cycle)
from budgetlm.evals.suites.base import EvalItem, Grade, Suite, render_prompt
from budgetlm.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tool, as_tools, call_tool, describe_tools

__all__ = [
    "DEFAULT_AGENT_PROMPT", "KBAgentSuite", "KBQuestion", "KnowledgeBase", "calculator", "kb_tools",
    "make_question", "scripted_solve",
]

DEFAULT_AGENT_PROMPT = (
    "{tools}\n\n"
    "Answer the question with facts from the knowledge base: look entities up with `search` (one name per "
    "call) and do arithmetic with `calculator`. Take one step at a time.\n\n"
    "Question: {question}\n\n"
    "When you know the answer, finish with a line 'Answer: <answer>'."
)
"""The default prompt template; ``{tools}`` becomes the tool list and ``{question}`` the question."""

KINDS: tuple[str, ...] = ("person", "city", "company")
RELATIONS: dict[str, tuple[str, ...]] = {
    "person": ("born_in", "works_for", "age"),
    "city": ("population", "country", "mayor"),
    "company": ("ceo", "headquartered_in", "founded"),
}
"""The relations of each entity kind, in the order :meth:`KnowledgeBase.search` lists them."""

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "s", "x")
_COMPANY_SUFFIXES = ("Corp", "Industries", "Labs", "Group", "Works", "Systems")
_COUNTRY_SUFFIXES = ("ia", "land", "stan", "ora")
MAX_KB_SIZE = 2000
"""The largest ``kb_size`` (people) a :class:`KBAgentSuite` accepts."""


def _label(relation: str) -> str:
    return relation.replace("_", " ")


@dataclass
class KnowledgeBase:
    """Made-up entities and their relations, generated from a seed (see :meth:`generate`)."""

    seed: int
    """The seed it was generated from."""
    kinds: dict[str, str] = field(default_factory=dict)
    """Entity name → kind (``person``, ``city`` or ``company``), in generation order."""
    relations: dict[str, dict[str, str | int]] = field(default_factory=dict)
    """Entity name → relation → value (an entity name, a country name or an int)."""
    _index: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Search index: lower-cased name token → entities (see :meth:`_token_index`)."""
    _index_of: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    """The entities the index was built for."""

    @classmethod
    def generate(cls, seed: int, n_people: int = 30, n_cities: int = 10, n_companies: int = 10) -> KnowledgeBase:
        """A knowledge base with the given entity counts; the same arguments give the same knowledge base."""
        for name, value, low in (("n_people", n_people, 2), ("n_cities", n_cities, 1), ("n_companies", n_companies, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise invalid(name, f"an integer >= {low}", value)
        if n_people < n_cities + n_companies:
            raise invalid("n_people", f"at least n_cities + n_companies = {n_cities + n_companies} (every city "
                          "needs a mayor and every company a CEO, all different people)", n_people,
                          "raise n_people or lower n_cities/n_companies")
        rng = random.Random(seed)
        used: set[str] = set()

        def word(lo: int = 2, hi: int = 3) -> str:
            while True:
                n = rng.randint(lo, hi)
                w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
                w = w.capitalize()
                if w not in used:
                    used.add(w)
                    return w

        countries = [word(2, 2) + rng.choice(_COUNTRY_SUFFIXES) for _ in range(max(2, n_cities // 3))]
        cities = [word() for _ in range(n_cities)]
        companies = [f"{word()} {rng.choice(_COMPANY_SUFFIXES)}" for _ in range(n_companies)]
        people = [f"{word()} {word()}" for _ in range(n_people)]
        kb = cls(seed)
        for p in people:
            kb.kinds[p] = "person"
            kb.relations[p] = {"born_in": rng.choice(cities), "works_for": rng.choice(companies),
                               "age": rng.randint(22, 85)}
        leaders = rng.sample(people, n_cities + n_companies)
        for c, mayor in zip(cities, leaders[:n_cities]):
            kb.kinds[c] = "city"
            kb.relations[c] = {"population": rng.randint(5_000, 3_000_000), "country": rng.choice(countries),
                               "mayor": mayor}
        for c, ceo in zip(companies, leaders[n_cities:]):
            kb.kinds[c] = "company"
            kb.relations[c] = {"ceo": ceo, "headquartered_in": rng.choice(cities), "founded": rng.randint(1850, 2020)}
            kb.relations[ceo]["works_for"] = c  # a CEO works for their own company
        return kb

    def entities(self, kind: str | None = None) -> list[str]:
        """All entity names (of one kind when ``kind`` is given), in generation order."""
        if kind is not None and kind not in KINDS:
            raise invalid("kind", f"one of {', '.join(KINDS)}", kind)
        return [e for e, k in self.kinds.items() if kind is None or k == kind]

    def _resolve(self, entity: str) -> str:
        if entity in self.kinds:
            return entity
        lowered = {e.lower(): e for e in self.kinds}
        if str(entity).lower() in lowered:
            return lowered[str(entity).lower()]
        close = difflib.get_close_matches(str(entity), list(self.kinds), n=3)
        hint = f"did you mean: {', '.join(close)}?" if close else "list the names with `entities()`"
        raise ConfigError(f"unknown entity {entity!r}; {hint}")

    def kind(self, entity: str) -> str:
        """The kind of an entity (names match case-insensitively)."""
        return self.kinds[self._resolve(entity)]

    def facts(self, entity: str) -> dict[str, str | int]:
        """The relations of an entity (a copy; names match case-insensitively)."""
        return dict(self.relations[self._resolve(entity)])

    def describe(self, entity: str) -> str:
        """One line: ``"Vorel Kantu (person): born in = Osmira; works for = Tralix Corp; age = 41"``."""
        name = self._resolve(entity)
        facts = "; ".join(f"{_label(r)} = {v}" for r, v in self.relations[name].items())
        return f"{name} ({self.kinds[name]}): {facts}"

    def _token_index(self) -> dict[str, list[str]]:
        """Lower-cased name token → the entities whose name has it (built once, rebuilt when entities change)."""
        if len(self._index_of) != len(self.kinds):
            self._index.clear()
            for e in self.kinds:
                for t in set(e.lower().split()):
                    self._index.setdefault(t, []).append(e)
            self._index_of = list(self.kinds)
        return self._index

    def search(self, query: str) -> str:
        """The facts of the entities (at most 3) named in ``query``, else of the closest names, one per line."""
        q = str(query).strip()
        ql = q.lower()
        index = self._token_index()
        tokens = set(re.findall(r"\w+", ql))
        candidates = {e for t in tokens for e in index.get(t, ()) if set(e.lower().split()) <= tokens}
        hits: list[tuple[int, str]] = []
        for e in candidates:
            m = re.search(r"(?<!\w)" + re.escape(e.lower()) + r"(?!\w)", ql)
            if m:
                hits.append((m.start(), e))
        if hits:
            return "\n".join(self.describe(e) for _, e in sorted(hits)[:3])
        close = self._closest(ql)
        if not close:
            return f"no entity matches {q!r}; try an exact name"
        return f"no exact match for {q!r}; closest:\n" + "\n".join(self.describe(e) for e in close)

    def _closest(self, query: str) -> list[str]:
        """Up to 3 entities whose name tokens best overlap the query's (rare tokens weigh more; typos allowed)."""
        index = self._token_index()
        score: dict[str, float] = {}
        for token in set(re.findall(r"\w+", query)):
            for near in difflib.get_close_matches(token, list(index), n=3, cutoff=0.75):
                for e in index[near]:
                    score[e] = score.get(e, 0.0) + 1.0 / len(index[near])
        order = {e: i for i, e in enumerate(self.kinds)}
        ranked = sorted(score, key=lambda e: (-score[e], order[e]))
        if not ranked:
            ranked = [self._resolve(e) for e in
                      difflib.get_close_matches(query, [e.lower() for e in self.kinds], n=3, cutoff=0.6)]
        return ranked[:3]


# ---------------------------------------------------------------- calculator

_BINOPS: dict[type[ast.operator], Callable[[float, float], float | complex]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**100
_ALLOWED = "numbers, + - * / // % **, parentheses and unary minus"


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT} in absolute value)")
            if abs(left) > 1 and abs(right) * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
                raise ValueError(f"{left} ** {right} is too large (results are limited to 1e100)")
        try:
            value = _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number (a negative number to a fractional power)")
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("the result is too large (results are limited to 1e100)")
        return value
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"the name {node.id!r}"
    elif isinstance(node, ast.Call):
        what = "a function call"
    elif isinstance(node, ast.Attribute):
        what = "attribute access"
    elif isinstance(node, ast.Constant):
        what = f"the constant {node.value!r}"
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        what = "'^' (use ** for powers)"
    elif isinstance(node, ast.BinOp | ast.UnaryOp):
        what = f"the operator {type(node.op).__name__}"
    raise ValueError(f"unsupported expression: {what}; only {_ALLOWED} are allowed")


def calculator(expression: object) -> str:
    """Evaluate arithmetic (``+ - * / // % **``, parentheses, unary minus) safely; integral results print as ints.

    ``expression`` is whatever the model's tool call passed, so it is checked here: text, or a bare
    number (booleans and anything else are refused with a message the model can act on).
    """
    if isinstance(expression, bool) or not isinstance(expression, str | int | float):
        raise ValueError(f"the expression must be text like '3 * (4 + 5)', got {type(expression).__name__}")
    text = str(expression).strip()
    if not text:
        raise ValueError("the expression is empty; write arithmetic like '3 * (4 + 5)'")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is too long ({len(text)} characters, at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"cannot parse {text!r}; write arithmetic with {_ALLOWED}") from None
    value = _eval(tree)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is not a finite number")
        if value.is_integer():
            return str(int(value))
        return format(value, ".12g")
    return str(value)


# ---------------------------------------------------------------- questions


@dataclass(frozen=True)
class _Branch:
    kind: str
    """The kind of the starting entity."""
    relations: tuple[str, ...]
    """The relations followed from it."""
    phrase: str = "{}"
    """How the branch's start is named in the question text (``{}`` is the start entity)."""


@dataclass(frozen=True)
class _Template:
    text: str
    """The question; ``{0}``, ``{1}`` are the branches' phrases."""
    branches: tuple[_Branch, ...]
    """One chain, or two whose results the calculation combines."""
    calculation: str | None = None
    """A calculator expression over the branches' results (``{0} - {1}``), or ``None``."""
    descending: bool = False
    """Order the branches so that their results descend (differences stay non-negative)."""

    @property
    def hops(self) -> int:
        return sum(len(b.relations) for b in self.branches)


def _one(kind: str, *relations: str, text: str, calc: str | None = None) -> _Template:
    return _Template(text, (_Branch(kind, relations),), calc)


_B = _Branch
TEMPLATES: tuple[_Template, ...] = (
    # 2 hops
    _one("company", "ceo", "born_in", text="In which city was the CEO of {0} born?"),
    _one("person", "works_for", "headquartered_in", text="In which city is the company that {0} works for headquartered?"),
    _one("city", "mayor", "age", text="How old is the mayor of {0}?"),
    _one("person", "born_in", "country", text="In which country was {0} born?"),
    _one("person", "works_for", "founded", calc="2025 - {0}",
         text="How many years before 2025 was the company that {0} works for founded?"),
    _Template("How many years older is {0} than {1}?", (_B("person", ("age",)), _B("person", ("age",))),
              "{0} - {1}", descending=True),
    # 3 hops
    _one("company", "ceo", "born_in", "population", text="What is the population of the city where the CEO of {0} was born?"),
    _one("person", "works_for", "headquartered_in", "mayor",
         text="Who is the mayor of the city where the company that {0} works for is headquartered?"),
    _one("city", "mayor", "works_for", "founded", text="In which year was the company that the mayor of {0} works for founded?"),
    _one("company", "ceo", "born_in", "country", text="In which country was the CEO of {0} born?"),
    _Template("How many years older is {0} than {1}?",
              (_B("company", ("ceo", "age"), "the CEO of {}"), _B("person", ("age",))), "{0} - {1}", descending=True),
    _Template("What is the combined population of the city where {0} was born and {1}?",
              (_B("person", ("born_in", "population")), _B("city", ("population",))), "{0} + {1}"),
    # 4 hops
    _one("company", "ceo", "born_in", "mayor", "age", text="How old is the mayor of the city where the CEO of {0} was born?"),
    _one("person", "born_in", "mayor", "works_for", "founded",
         text="In which year was the company founded that employs the mayor of the city where {0} was born?"),
    _one("company", "headquartered_in", "mayor", "works_for", "ceo",
         text="Who is the CEO of the company that the mayor of the city where {0} is headquartered works for?"),
    _one("person", "works_for", "ceo", "born_in", "country",
         text="In which country was the CEO of the company that {0} works for born?"),
    _Template("How many years older is {0} than {1}?",
              (_B("company", ("ceo", "age"), "the CEO of {}"), _B("city", ("mayor", "age"), "the mayor of {}")),
              "{0} - {1}", descending=True),
    _Template("What is the combined population of the city where {0} was born and the city where {1} was born?",
              (_B("person", ("born_in", "population")), _B("person", ("born_in", "population"))), "{0} + {1}"),
)
"""The question templates: six per hop count (2, 3, 4), two of each ending in arithmetic."""
HOPS: tuple[int, ...] = (2, 3, 4)


@dataclass(frozen=True)
class KBQuestion:
    """A generated question, its answer and the lookups that reach it."""

    question: str
    """The question text."""
    answer: str
    """The gold answer (a name, or an integer as text)."""
    chain: list[dict[str, Any]]
    """The lookups in order: ``{"entity", "relation", "value", "branch"}`` (``branch``: which chain, from 0)."""
    calculation: str | None = None
    """The final arithmetic over the branches' results (``"{0} - {1}"``), or ``None``."""

    @property
    def hops(self) -> int:
        """The number of lookups."""
        return len(self.chain)

    @property
    def needs_calculator(self) -> bool:
        """Whether the last step is arithmetic."""
        return self.calculation is not None


def _follow(kb: KnowledgeBase, start: str, relations: tuple[str, ...], branch: int) -> list[dict[str, Any]]:
    steps, entity = [], start
    for relation in relations:
        value = kb.relations[entity][relation]
        steps.append({"entity": entity, "relation": relation, "value": value, "branch": branch})
        entity = str(value)
    return steps


def _instantiate(kb: KnowledgeBase, t: _Template, rng: random.Random) -> KBQuestion | None:
    starts = [rng.choice(kb.entities(b.kind)) for b in t.branches]
    chains = [_follow(kb, s, b.relations, i) for i, (s, b) in enumerate(zip(starts, t.branches))]
    if len({c[-1]["entity"] for c in chains}) < len(chains):  # two chains must end at different entities
        return None
    branches = list(t.branches)
    if t.descending and chains[0][-1]["value"] < chains[1][-1]["value"]:
        starts, chains, branches = starts[::-1], chains[::-1], branches[::-1]
        for i, c in enumerate(chains):
            for step in c:
                step["branch"] = i
    text = t.text.format(*(b.phrase.format(s) for b, s in zip(branches, starts)))
    chain = [step for c in chains for step in c]
    if t.calculation is None:
        return KBQuestion(text, str(chain[-1]["value"]), chain)
    answer = calculator(t.calculation.format(*(c[-1]["value"] for c in chains)))
    return KBQuestion(text, answer, chain, t.calculation)


def make_question(kb: KnowledgeBase, rng: random.Random, hops: int) -> KBQuestion:
    """A random question of ``hops`` lookups (2 to 4) about ``kb``, drawn with ``rng``."""
    if hops not in HOPS:
        raise invalid("hops", "2, 3 or 4", hops)
    templates = [t for t in TEMPLATES if t.hops == hops]
    first = rng.randrange(len(templates))
    for t in templates[first:] + templates[:first]:  # single-chain templates always succeed
        for _ in range(30):
            q = _instantiate(kb, t, rng)
            if q is not None:
                return q
    raise ConfigError(f"could not generate a {hops}-hop question; the knowledge base is too small")  # unreachable


# ---------------------------------------------------------------- suite


def kb_tools(kb: KnowledgeBase) -> list[Tool]:
    """The ``search`` and ``calculator`` tools over ``kb``."""
    return [
        Tool("search", kb.search, "search(query): the facts of the person, city or company named in the query "
             "(exact names work best), e.g. {\"query\": \"Tralix Corp\"}"),
        Tool("calculator", calculator, "calculator(expression): evaluate arithmetic with + - * / // % ** and "
             "parentheses, e.g. {\"expression\": \"(41 - 29) * 2\"}"),
    ]


DIFFICULTIES: tuple[int | str, ...] = (1, 2, 3, "mixed")


class KBAgentSuite(Suite):
    """``size`` multi-hop questions over a knowledge base generated from ``seed``, with search and calculator tools."""

    name = "kb_agent"

    def __init__(
        self,
        size: int = 100,
        seed: int = 1,
        difficulty: int | str = "mixed",
        prompt: str = DEFAULT_AGENT_PROMPT,
        kb_size: int = 30,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise invalid("size", "a positive integer", size)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise invalid("seed", "a non-negative integer", seed)
        if isinstance(difficulty, bool) or difficulty not in DIFFICULTIES:
            raise ConfigError(f"`difficulty` must be 1, 2, 3 or 'mixed', got {difficulty!r}; "
                              "1, 2 and 3 mean 2, 3 and 4 hops")
        if not isinstance(prompt, str) or "{question}" not in prompt:
            raise invalid("prompt", "a template containing {question} (and optionally {tools})", prompt)
        if not isinstance(kb_size, int) or isinstance(kb_size, bool) or not 6 <= kb_size <= MAX_KB_SIZE:
            raise invalid("kb_size", f"an integer from 6 to {MAX_KB_SIZE} (the number of people)", kb_size)
        self.size = size
        self.seed = seed
        self.difficulty = difficulty
        self.prompt = prompt
        self.kb_size = kb_size
        n = max(2, kb_size // 3)
        self.kb = KnowledgeBase.generate(seed, n_people=kb_size, n_cities=n, n_companies=n)
        self.tools = kb_tools(self.kb)
        self._numeric = _graders.NumericGrader(rel_tol=1e-9, abs_tol=1e-6)
        self._normalized = _graders.NormalizedGrader()
        self._items: list[EvalItem] | None = None

    def _build(self) -> list[EvalItem]:
        rng = random.Random(f"kb_agent-questions-{self.seed}")
        tools_text = describe_tools(as_tools(self.tools))
        seen: set[str] = set()
        items = []
        for i in range(self.size):
            d = (i % 3) + 1 if self.difficulty == "mixed" else int(self.difficulty)
            for _ in range(20):  # prefer questions not asked yet
                q = make_question(self.kb, rng, HOPS[d - 1])
                if q.question not in seen:
                    break
            seen.add(q.question)
            content = render_prompt(self.prompt, {"question": q.question, "tools": tools_text})
            items.append(EvalItem(
                id=f"kb-{self.seed}-{i}",
                messages=[{"role": "user", "content": content}],
                gold=q.answer,
                question=q.question,
                metadata={"hops": q.hops, "chain": q.chain, "needs_calculator": q.needs_calculator,
                          "calculation": q.calculation, "difficulty": d},
                tools=list(self.tools),
            ))
        return items

    def items(self) -> list[EvalItem]:
        if self._items is None:
            self._items = self._build()
        return list(self._items)

    def grade(self, item: EvalItem, text: str | None) -> Grade:
        numeric = _graders.parse_number(item.gold) is not None
        return (self._numeric if numeric else self._normalized).grade(text, item.gold, item.metadata)

    def __repr__(self) -> str:
        return (f"KBAgentSuite(size={self.size}, seed={self.seed}, difficulty={self.difficulty!r}, "
                f"kb_size={self.kb_size})")


# ---------------------------------------------------------------- scripted solver


def _observe(tools: dict[str, Tool], name: str, arguments: dict[str, str]) -> str:
    text = TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE
    outcome = call_tool(text, tools)
    if outcome.error:
        raise RuntimeError(f"tool call {name}({arguments}) failed: {outcome.observation}")
    return outcome.observation


def _read_relation(observation: str, entity: str, relation: str) -> str:
    """The value of ``relation`` on ``entity``'s line of a search observation."""
    for line in observation.splitlines():
        head, sep, facts = line.partition("): ")
        if sep and head.lower().startswith(entity.lower() + " ("):
            for fact in facts.split("; "):
                label, eq, value = fact.partition(" = ")
                if eq and label == _label(relation):
                    return value.strip()
    raise RuntimeError(f"no {relation!r} of {entity!r} in the observation {observation!r}")


def scripted_solve(item: EvalItem) -> str:
    """Answer a :class:`KBAgentSuite` item through its tools only; returns ``"Answer: <answer>"``.

    It reads the plan from ``item.metadata`` (the relations of ``chain``, each branch's first entity
    and the ``calculation``) and takes every value from ``search`` and ``calculator`` observations.
    """
    tools = as_tools(item.tools)
    results: dict[Any, str] = {}
    branch, entity = None, ""
    for step in item.metadata["chain"]:
        if step["branch"] != branch:  # a chain starts at the entity the question names
            branch, entity = step["branch"], step["entity"]
        observation = _observe(tools, "search", {"query": entity})
        entity = _read_relation(observation, entity, step["relation"])
        results[branch] = entity  # the last value of each chain
    values = [results[b] for b in sorted(results)]
    calculation = item.metadata.get("calculation")
    if calculation:
        return "Answer: " + _observe(tools, "calculator", {"expression": calculation.format(*values)})
    return f"Answer: {values[-1]}"
