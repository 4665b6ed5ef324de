"""rewards.py: a table of reward cases, equivalence through math-verify, bounded time, threads and
processes, the benchmarks' own answers, and a fuzz test."""

import json
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SHARED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewards
from rewards import last_boxed, math_verify_equal, reward_details, thinkless_reward

MATH500 = os.path.join(SHARED, "data", "math500.jsonl")
REWARDS = {1.0, 0.5, -1.0}

# (response, ground truth, expected reward, expected mode, expected extracted answer)
CASES = [
    # each mode x correct / wrong
    ("<short>\nThe answer is \\boxed{2}.", "2", 1.0, "short", "2"),
    ("<think>\nso it is 2\n</think>\n\nThe answer is \\boxed{2}.", "2", 0.5, "think", "2"),
    ("<short>\n\\boxed{3}", "2", -1.0, "short", "3"),
    ("<think>\n...</think>\n\\boxed{3}", "2", -1.0, "think", "3"),
    # unboxed answers: format errors
    ("<short>\nThe answer is 2.", "2", -1.0, "short", None),
    ("<think>\nthe answer is \\boxed{2}\n</think>\n\nThe answer is 2.", "2", -1.0, "think", None),  # box in the chain
    ("<short>\\boxed{}", "2", -1.0, "short", None),
    ("<short>\\boxed{\\frac{1}{2}", "\\frac{1}{2}", -1.0, "short", None),  # unclosed box
    # truncated think: no </think>
    ("<think>\nhmm, \\boxed{2}", "2", -1.0, "think", None),
    # no control token, or not at the start
    ("The answer is \\boxed{2}", "2", -1.0, None, None),
    (" <short>\\boxed{2}", "2", -1.0, None, None),
    ("</think>\\boxed{2}", "2", -1.0, None, None),
    # nested braces
    ("<short>\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0, "short", "\\frac{\\sqrt{3}}{2}"),
    ("<short>\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0, "short", "\\{1, 2\\}"),
    ("<short>\\boxed{\\left\\{ x \\right.}", "x", -1.0, "short", "\\left\\{ x \\right."),  # escaped brace, unbalanced
    # several boxes: the last wins
    ("<short>\\boxed{1} no wait \\boxed{2}", "2", 1.0, "short", "2"),
    ("<short>\\boxed{2} no wait \\boxed{1}", "2", -1.0, "short", "1"),
    ("<think>\\boxed{2}</think>\\boxed{1}", "2", -1.0, "think", "1"),
    # other box forms
    ("<short>so $\\boxed 7$.", "7", 1.0, "short", "7"),
    ("<short>\\fbox{7}", "7", 1.0, "short", "7"),
    # list ground truth
    ("<short>\\boxed{4}", ["3", "4"], 1.0, "short", "4"),
    ("<short>\\boxed{5}", ["3", "4"], -1.0, "short", "5"),
    # equivalent forms (math-verify)
    ("<short>\\boxed{0.5}", "\\frac{1}{2}", 1.0, "short", "0.5"),
    ("<short>\\boxed{1+x^2}", "x^2+1", 1.0, "short", "1+x^2"),
    ("<short>\\boxed{(3,\\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0, "short", "(3,\\pi/2)"),
    ("<short>\\boxed{10}", "10\\%", 1.0, "short", "10"),
    ("<short>\\boxed{5\\text{ cm}}", "5", 1.0, "short", "5\\text{ cm}"),
    ("<short>\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", 1.0, "short", "\\dfrac{14}{3}"),
    ("<short>\\boxed{1000}", "1,000", 1.0, "short", "1000"),
    ("<think>x</think>\\boxed{\\text{(C)}}", "C", 0.5, "think", "\\text{(C)}"),
    # and non-equivalent ones
    ("<short>\\boxed{x^2-1}", "x^2+1", -1.0, "short", "x^2-1"),
    ("<short>\\boxed{0.51}", "\\frac{1}{2}", -1.0, "short", "0.51"),
]


@pytest.mark.parametrize("response,gold,reward,mode,answer", CASES)
def test_reward_table(response, gold, reward, mode, answer):
    d = reward_details(response, gold)
    assert (d.mode, d.answer) == (mode, answer), d
    assert d.format_ok == (answer is not None)
    assert thinkless_reward(response, gold) == reward, d
    assert d.error is None or not d.format_ok, d  # graded cases carry no error


def test_reward_values_and_custom_grader():
    think, short = "<think>a</think>\\boxed{2}", "<short>\\boxed{2}"
    assert thinkless_reward(think, "2", correct_think=0.8) == 0.8
    assert thinkless_reward(short, "3", wrong=-0.5) == -0.5
    assert thinkless_reward("<short>", "3", format_error=-2.0) == -2.0
    # exact match grader (the toy task): 0.5 and 1/2 are no longer the same
    assert thinkless_reward("<short>\\boxed{0.5}", "\\frac{1}{2}", is_equivalent=str.__eq__) == -1.0
    assert thinkless_reward("<short>\\boxed{0.5}", "0.5", is_equivalent=str.__eq__) == 1.0
    d = reward_details(short, "2", is_equivalent=lambda a, g: 1 / 0)  # a grader that raises is reported
    assert not d.correct and "ZeroDivisionError" in d.error


def test_bad_inputs_never_raise():
    for response, gold in [(None, "2"), (b"<short>\\boxed{2}", "2"), ("<short>\\boxed{2}", None),
                           ("<short>\\boxed{2}", []), ("<short>\\boxed{2}", [2]), ("<short>\\boxed{2}", 2)]:
        d = reward_details(response, gold)
        assert not d.correct and d.error, (response, gold, d)
        assert thinkless_reward(response, gold) == -1.0


def test_unparseable_ground_truth_is_reported():
    d = reward_details("<short>\\boxed{E_3}", "E_{1},E_{2}")  # math-verify finds no math in this gold
    assert not d.correct and "ground truth not parsed" in d.error
    d = reward_details("<short>\\boxed{E_1, E_2}", "E_{1},E_{2}")
    assert d.correct  # still graded, by string comparison


def test_last_boxed():
    assert last_boxed("\\boxed{a}\\boxed{b{c}}") == "b{c}"
    assert last_boxed("\\boxed {x}") == "x"
    assert last_boxed("\\boxed{\\\\}") == "\\\\"  # an escaped backslash does not escape the brace
    assert last_boxed("\\boxedx{1}") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize("answer", ["9^{9^{9^{9}}}", "10^{10^{10^{10}}}!"])
def test_pathological_answer_is_bounded(monkeypatch, answer):
    monkeypatch.setattr(rewards, "GRADE_TIMEOUT_S", 1.0)
    t = time.time()
    d = reward_details("<short>\\boxed{" + answer + "}", "1")
    assert time.time() - t < 1.0 + 5.0  # deadline, kill, and no more
    assert d.format_ok and not d.correct and "timed out" in d.error
    assert thinkless_reward("<short>\\boxed{2}", "\\frac{4}{2}") == 1.0  # a fresh worker takes over


def test_long_response_is_fast():
    response = "<think>\n" + "Let me think about {this} again. " * 3200 + "</think>\n\n\\boxed{\\frac{1}{2}}"
    assert len(response) > 100_000
    t = time.time()
    assert thinkless_reward(response, "0.5") == 0.5
    assert thinkless_reward(response[:-30], "0.5") == -1.0
    assert thinkless_reward("<short>\\boxed{" + "1+" * 60_000 + "1}", "2") == -1.0  # too long for sympy
    assert time.time() - t < 5.0


def test_threads_and_forked_processes():
    jobs = [(f"<short>\\boxed{{\\frac{{{k}}}{{2}}}}", f"{k / 2}") for k in range(1, 13)]
    jobs += [("<think>.</think>\\boxed{x^2+2x+1}", "(x+1)^2"), ("<short>\\boxed{3}", "\\frac{7}{2}")]
    serial = [thinkless_reward(r, g) for r, g in jobs]
    assert serial == [1.0] * 12 + [0.5, -1.0]
    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(lambda rg: thinkless_reward(*rg), jobs)) == serial
    # daemonic pool processes cannot use multiprocessing children; our subprocess workers do fine
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.starmap(thinkless_reward, jobs) == serial


FRAGMENTS = ["<think>", "</think>", "<short>", "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\", "$", "\n", " ",
             "1", "2", "9", "x", "^", "+", "-", "/", ".", ",", "%", "\\frac", "\\frac{1}{2}", "\\left(", "\\right)",
             "\\text{cm}", "\\sqrt", "(", ")", "\\{", "\\}", "!", "=", "\\infty", "\\pi", "a"]
GOLDS = ["1", "2", "\\frac{1}{2}", "x^2+1", ["3", "4"], "(1,2)", "\\text{(A)}", "9^{9}"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40),
       gold=st.sampled_from(GOLDS))
def test_fuzz_reward_is_one_of_the_values_in_bounded_time(monkeypatch, parts, gold):
    monkeypatch.setattr(rewards, "GRADE_TIMEOUT_S", 1.0)
    response = "".join(parts)
    t = time.time()
    r = thinkless_reward(response, gold)
    assert r in REWARDS
    assert time.time() - t < rewards.GRADE_TIMEOUT_S + rewards.WORKER_START_TIMEOUT_S


@pytest.mark.skipif(not os.path.isfile(MATH500), reason=f"{MATH500} not present")
def test_math500_own_answers_are_accepted():
    with open(MATH500) as f:
        answers = [json.loads(line)["answer"] for line in f]
    assert len(answers) == 500
    for a in answers:  # both modes, through the whole reward
        assert thinkless_reward(f"<short>\nSo \\boxed{{{a}}}.", a) == 1.0, a
        assert thinkless_reward(f"<think>\n...\n</think>\n\nSo \\boxed{{{a}}}.", a) == 0.5, a
    # the fast path above compares strings; math-verify itself must also accept every gold format
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda a: math_verify_equal(a, [a]), answers))
    bad = [(a, r) for a, r in zip(answers, results) if r != (True, None)]
    assert not bad, bad
