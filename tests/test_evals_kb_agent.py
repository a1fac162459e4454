"""The kb_agent environment (knowledge base, search, calculator, questions, suite, scripted solver) and reasoning_gym_agent."""

from __future__ import annotations

import copy
import random
import re

import pytest

from budgetlm.errors import ConfigError
from budgetlm.evals import suites
from budgetlm.evals.suites.base import EvalItem
from budgetlm.evals.suites.kb_agent import (
    DEFAULT_AGENT_PROMPT,
    KBAgentSuite,
    KnowledgeBase,
    calculator,
    make_question,
    scripted_solve,
)
from budgetlm.evals.suites.rg_agent import ReasoningGymAgentSuite
from budgetlm.tools import Tool, ToolCall, as_tools, call_tool


def _snapshot(items: list[EvalItem]) -> list[tuple[object, ...]]:
    return [(i.id, i.question, i.gold, i.messages, i.metadata, [t.name for t in i.tools]) for i in items]


# ---------------------------------------------------------------- scripted solver over every item


@pytest.mark.parametrize("seed", [1, 7, 123])
def test_scripted_solver_answers_every_question(seed: int) -> None:
    suite = KBAgentSuite(size=70, seed=seed)  # 3 seeds x 70 = 210 items, all difficulties
    items = suite.items()
    assert len(items) == 70
    for item in items:
        text = scripted_solve(item)
        grade = suite.grade(item, text)
        assert grade.correct and grade.score == 1.0, (item.question, item.gold, text)
        assert text == f"Answer: {item.gold}"
        assert item.metadata["hops"] == len(item.metadata["chain"]) == item.metadata["difficulty"] + 1


@pytest.mark.parametrize("kb_size", [6, 12, 300])  # smallest allowed, small, large knowledge base
def test_scripted_solver_works_on_any_kb_size(kb_size: int) -> None:
    suite = KBAgentSuite(size=30, seed=5, kb_size=kb_size)
    assert all(suite.grade(i, scripted_solve(i)).correct for i in suite.items())


def test_scripted_solver_uses_only_tool_observations() -> None:
    suite = KBAgentSuite(size=30, seed=3)
    for original in suite.items():
        calls: list[tuple[str, dict[str, object]]] = []

        def spy(tool: Tool, calls: list[tuple[str, dict[str, object]]] = calls) -> Tool:
            def fn(**kw: object) -> object:
                calls.append((tool.name, kw))
                return tool.fn(**kw)
            return Tool(tool.name, fn, tool.description)

        blind = copy.deepcopy(original)
        blind.gold = None
        for step in blind.metadata["chain"]:  # keep the plan, hide every value
            step["value"] = None
            if step is not blind.metadata["chain"][0] and step["branch"] == 0:
                step["entity"] = None  # later entities of a chain come from observations
        blind.tools = [spy(t) for t in original.tools]
        text = scripted_solve(blind)
        assert suite.grade(original, text).correct
        searches = [c for c in calls if c[0] == "search"]
        assert len(searches) == original.metadata["hops"]
        assert any(c[0] == "calculator" for c in calls) == original.metadata["needs_calculator"]


# ---------------------------------------------------------------- determinism and difficulty


def test_same_seed_reproduces_items_and_other_seeds_differ() -> None:
    a, b = KBAgentSuite(size=30, seed=4), KBAgentSuite(size=30, seed=4)
    assert _snapshot(a.items()) == _snapshot(b.items())
    assert a.kb == b.kb
    c = KBAgentSuite(size=30, seed=5)
    assert [i.question for i in c.items()] != [i.question for i in a.items()]
    assert c.kb.entities() != a.kb.entities()
    assert [i.id for i in a.items()][:2] == ["kb-4-0", "kb-4-1"]


@pytest.mark.parametrize(
    ("difficulty", "hops"),
    [
        (1, {2}),  # easiest: two lookups
        (2, {3}),
        (3, {4}),  # hardest: four lookups
        ("mixed", {2, 3, 4}),  # cycles through all hop counts
    ],
)
def test_difficulty_sets_hop_counts(difficulty: int | str, hops: set[int]) -> None:
    items = KBAgentSuite(size=30, seed=2, difficulty=difficulty).items()
    assert {i.metadata["hops"] for i in items} == hops
    assert {len(i.metadata["chain"]) for i in items} == hops
    assert any(i.metadata["needs_calculator"] for i in items)  # every difficulty has calculator questions
    assert any(not i.metadata["needs_calculator"] for i in items)


def test_mixed_cycles_hops_in_order() -> None:
    items = KBAgentSuite(size=6, seed=1).items()
    assert [i.metadata["hops"] for i in items] == [2, 3, 4, 2, 3, 4]
    assert [i.metadata["difficulty"] for i in items] == [1, 2, 3, 1, 2, 3]


def test_chain_is_followable_through_the_kb() -> None:
    suite = KBAgentSuite(size=40, seed=9)
    for item in suite.items():
        chain = item.metadata["chain"]
        for prev, step in zip(chain, chain[1:]):
            if step["branch"] == prev["branch"]:
                assert step["entity"] == prev["value"]
        for step in chain:
            assert suite.kb.facts(step["entity"])[step["relation"]] == step["value"]
        if not item.metadata["needs_calculator"]:
            assert str(chain[-1]["value"]) == item.gold


def test_items_carry_tools_and_prompt() -> None:
    item = KBAgentSuite(size=1, seed=1).items()[0]
    assert [t.name for t in item.tools] == ["search", "calculator"]
    content = item.messages[0]["content"]
    assert item.messages[0]["role"] == "user"
    assert item.question in content and "Answer:" in content and "<tool_call>" in content
    assert "- search:" in content and "- calculator:" in content
    assert "{tools}" in DEFAULT_AGENT_PROMPT
    custom = KBAgentSuite(size=1, seed=1, prompt="Q: {question}").items()[0]
    assert custom.messages[0]["content"] == f"Q: {custom.question}"


# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("41 - 29", "12"),
        ("(2 + 3) * 4", "20"),
        ("-5 + 2", "-3"),  # unary minus
        ("+7", "7"),  # unary plus
        ("7 / 2", "3.5"),
        ("8 / 2", "4"),  # integral float prints without .0
        ("7 // 2", "3"),
        ("7 % 3", "1"),
        ("2 ** 10", "1024"),
        ("2 ** -1", "0.5"),  # negative exponent
        ("1.5 * 2", "3"),
        ("10 / 3", "3.33333333333"),
        (" 3 ", "3"),  # surrounding blanks
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, result: str) -> None:
    assert calculator(expression) == result


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "name 'x'"),  # a variable
        ("__import__('os')", "function call"),  # a call
        ("(1).real", "attribute access"),  # attribute access
        ("abs(-3)", "function call"),
        ("'a' * 3", "constant 'a'"),  # strings
        ("True + 1", "constant True"),  # booleans are not numbers here
        ("2 ^ 3", "use **"),  # xor mistaken for power
        ("1 < 2", "Compare"),
        ("[1, 2]", "List"),
        ("lambda: 1", "Lambda"),
        ("1 / 0", "division by zero"),
        ("10 ** 1000", "too large"),  # exponent cap
        ("(10 ** 60) ** 2", "too large"),  # nested powers stay bounded
        ("99 ** 60", "too large"),  # a small exponent with a too large result
        ("", "empty"),
        ("1 +", "cannot parse"),
        ("1" * 600, "too long"),
        ("(-8) ** 0.5", "not a real number"),
    ],
)
def test_calculator_rejects_everything_else(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        calculator(expression)


def test_calculator_error_becomes_an_observation() -> None:
    tools = as_tools(KBAgentSuite(size=1).items()[0].tools)
    out = call_tool(ToolCall("calculator", {"expression": "open('f')"}), tools)
    assert out.error and out.observation.startswith("error: ValueError:") and "function call" in out.observation


# ---------------------------------------------------------------- search and knowledge base


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.generate(11, n_people=15, n_cities=4, n_companies=4)


def test_search_exact_and_case_insensitive(kb: KnowledgeBase) -> None:
    person = kb.entities("person")[0]
    facts = kb.facts(person)
    expected = (f"{person} (person): born in = {facts['born_in']}; works for = {facts['works_for']}; "
                f"age = {facts['age']}")
    assert kb.search(person) == expected
    assert kb.search(person.upper()) == expected  # case-insensitive
    assert kb.search(f"  who is {person.lower()}? ") == expected  # the name inside a longer query
    city = kb.entities("city")[0]
    assert kb.search(city).startswith(f"{city} (city): population = ")
    company = kb.entities("company")[0]
    assert kb.search(company).startswith(f"{company} (company): ceo = ")


def test_search_lists_at_most_three_entities_in_query_order(kb: KnowledgeBase) -> None:
    names = kb.entities("person")[:4]
    lines = kb.search(" and ".join(reversed(names))).splitlines()
    assert [line.split(" (")[0] for line in lines] == list(reversed(names))[:3]


@pytest.mark.parametrize(
    "query",
    [
        "xyz",  # nothing like any name
        "",  # empty
        "12345",  # digits only
    ],
)
def test_search_no_match(kb: KnowledgeBase, query: str) -> None:
    assert kb.search(query) == f"no entity matches {query!r}; try an exact name"


def test_search_suggests_the_closest_name_for_a_typo(kb: KnowledgeBase) -> None:
    person = kb.entities("person")[3]
    out = kb.search(person[:-1])
    assert out.startswith("no exact match for")
    assert out.splitlines()[1].startswith(f"{person} (person)")


def test_names_are_unique_and_each_search_finds_exactly_one_entity() -> None:
    kb = KnowledgeBase.generate(3, n_people=60, n_cities=20, n_companies=20)
    names = kb.entities()
    assert len(names) == len(set(names)) == 100
    assert {kb.kind(e) for e in names} == {"person", "city", "company"}
    for e in names:
        assert kb.search(e).count("\n") == 0 and kb.search(e).startswith(f"{e} (")
        assert all(re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)?", part) for part in [e])
    mayors = [kb.facts(c)["mayor"] for c in kb.entities("city")]
    ceos = [kb.facts(c)["ceo"] for c in kb.entities("company")]
    assert len(set(mayors + ceos)) == 40  # all leaders are different people
    assert all(kb.facts(kb.facts(c)["ceo"])["works_for"] == c for c in kb.entities("company"))


def test_unknown_entity_in_facts(kb: KnowledgeBase) -> None:
    with pytest.raises(ConfigError, match="unknown entity 'Nobody'"):
        kb.facts("Nobody")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n_people": 1}, "n_people"),  # too few people
        ({"n_cities": 0}, "n_cities"),
        ({"n_companies": "3"}, "n_companies"),  # wrong type
        ({"n_people": 5, "n_cities": 3, "n_companies": 3}, "n_people"),  # fewer people than leaders
    ],
)
def test_generate_validates_counts(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}`"):
        KnowledgeBase.generate(1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("hops", [1, 5, "2"])  # below, above, wrong type
def test_make_question_validates_hops(kb: KnowledgeBase, hops: object) -> None:
    with pytest.raises(ConfigError, match="`hops`"):
        make_question(kb, random.Random(0), hops)  # type: ignore[arg-type]


# ---------------------------------------------------------------- suite parameters, grading, specs


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": 0}, "size"),  # empty suite
        ({"size": True}, "size"),  # bool is not a size
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"difficulty": 7}, "difficulty"),  # out of range
        ({"difficulty": 0}, "difficulty"),
        ({"difficulty": "hard"}, "difficulty"),  # unknown name
        ({"difficulty": True}, "difficulty"),  # True == 1 but is not a difficulty
        ({"prompt": "no placeholder"}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"kb_size": 5}, "kb_size"),  # too small for distinct mayors and CEOs
        ({"kb_size": 10**6}, "kb_size"),  # too large
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}` must be"):
        KBAgentSuite(**kwargs)  # type: ignore[arg-type]


def test_difficulty_message() -> None:
    with pytest.raises(ConfigError, match=r"`difficulty` must be 1, 2, 3 or 'mixed', got 7"):
        KBAgentSuite(difficulty=7)


def test_grading_numeric_and_names() -> None:
    items = KBAgentSuite(size=30, seed=8).items()
    suite = KBAgentSuite(size=30, seed=8)
    numeric = next(i for i in items if i.gold.isdigit() and int(i.gold) > 1000)
    name = next(i for i in items if not i.gold.lstrip("-").isdigit())
    assert suite.grade(numeric, f"Answer: {int(numeric.gold):,}").correct  # thousands separators
    assert suite.grade(numeric, f"Answer: {numeric.gold}.0").correct
    assert not suite.grade(numeric, f"Answer: {int(numeric.gold) + 1}").correct  # off by one
    assert suite.grade(name, f"Answer: {name.gold.lower()}.").correct  # case and trailing period
    wrong = suite.grade(name, "Answer: Somebody Else")
    assert not wrong.correct and wrong.score == 0.0 and wrong.answer == "Somebody Else"
    assert suite.grade(name, None).answer is None and not suite.grade(name, None).correct


def test_unknown_tool_gives_error_observation() -> None:
    tools = as_tools(KBAgentSuite(size=1).items()[0].tools)
    out = call_tool('<tool_call>{"name": "wikipedia", "arguments": {"query": "x"}}</tool_call>', tools)
    assert out.error == "unknown tool"
    assert out.observation == "error: unknown tool 'wikipedia'; available: calculator, search"
    bad = call_tool(ToolCall("search", {"q": "x"}), tools)  # wrong argument name
    assert bad.error and bad.observation.startswith("error: bad arguments for 'search'")


def test_kb_agent_spec() -> None:
    suite = suites.get("kb_agent?size=5&seed=2&difficulty=2")
    assert isinstance(suite, KBAgentSuite) and suite.name == "kb_agent" and "kb_agent" in suites.names()
    items = suite.items()
    assert len(items) == 5 and {i.metadata["hops"] for i in items} == {3}
    assert all(i.tools and i.id.startswith("kb-2-") for i in items)
    assert suites.get("kb_agent?difficulty=mixed&size=3").difficulty == "mixed"
    with pytest.raises(ConfigError, match="takes no ':' part"):
        suites.get("kb_agent:x")
    with pytest.raises(ConfigError, match="unknown option"):
        suites.get("kb_agent?hops=3")


def test_reasoning_gym_agent_spec() -> None:
    suite = suites.get("reasoning_gym_agent:chain_sum?size=3&seed=1")
    assert isinstance(suite, ReasoningGymAgentSuite) and suite.name == "reasoning_gym_agent:chain_sum"
    plain = suites.get("reasoning_gym:chain_sum?size=3&seed=1")
    items, plain_items = suite.items(), plain.items()
    assert [(i.id, i.question, i.gold) for i in items] == [(i.id, i.question, i.gold) for i in plain_items]
    for item in items:
        assert [t.name for t in item.tools] == ["calculator"] and item.metadata["agent"] is True
        content = item.messages[0]["content"]
        assert item.question in content and "- calculator:" in content and "Answer:" in content
        assert suite.grade(item, f"Answer: {item.gold}").correct  # reasoning-gym's own scoring
        assert not suite.grade(item, f"Answer: {int(item.gold) + 1}").correct
    out = call_tool(ToolCall("calculator", {"expression": "4 - 1 - 7"}), as_tools(items[0].tools))
    assert out.observation == "-4" and out.error is None
    assert not plain_items[0].tools  # the plain suite is unchanged
    assert "ReasoningGymAgentSuite('chain_sum'" in repr(suite)
