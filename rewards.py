"""Thinkless reward: decoded response text + ground truth -> scalar reward (THINKLESS.md, section 4).

    outcome                                               reward (official values)
    correct in <short> mode                               +1.0
    correct in <think> mode                               +0.5
    wrong, either mode                                    -1.0
    format error: no control token at the start, <think>
      without </think> (a truncated chain), no \\boxed{}  -1.0

Parsing is plain Python: the mode is read from the first characters of the text (the control token
is response token 0, so the decoded text starts with it); the answer part is what follows `</think>`
(think mode) or `<short>` (short mode); the answer is the content of the LAST `\\boxed{...}` there
(nested braces, `\\boxed 5` without braces and `\\fbox{...}` too).

Correctness is checked first by normalised string equality (fast, and needs no parser), then by
math-verify's symbolic equivalence (`0.5` = `\\frac{1}{2}`, `x^2+1` = `1+x^2`, units, `\\text{}`, ...),
or by a caller-supplied `is_equivalent(answer, ground_truth)` (e.g. exact match for a toy task).

Why a worker process: sympy can run for hours on a short answer (`\\boxed{9^{9^{9^{9}}}}` gets
evaluated while comparing), often inside C code that no Python-level interrupt reaches, and
math-verify's own timeout uses SIGALRM, which only works in the main thread. So math-verify runs,
with its timeout disabled, in long-lived child processes (`python rewards.py --grader-worker`,
JSON lines over pipes). The caller waits at most GRADE_TIMEOUT_S for the answer, and a worker past
its deadline is killed and replaced. Workers are started with subprocess, not multiprocessing, so
grading also works from threads, from daemonic pool processes and from a process holding a CUDA
context; one worker per concurrent caller, reused across calls. Time per call is bounded by
GRADE_TIMEOUT_S (plus WORKER_START_TIMEOUT_S the first time a worker has to be started).

Nothing here raises: any problem (bad types, unparseable ground truth, grader timeout) ends up in
RewardDetails.error and, for the reward, counts as a wrong answer or a format error.
"""

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

THINK, END_THINK, SHORT = "<think>", "</think>", "<short>"
GRADE_TIMEOUT_S = 5.0          # deadline for one math-verify comparison
WORKER_START_TIMEOUT_S = 60.0  # python + sympy import, on a busy machine
MAX_ANSWER_CHARS = 1000        # longer boxed contents are not sent to sympy (longest MATH answer: 159)


@dataclass
class RewardDetails:
    mode: str | None       # "think", "short", or None (no control token at the start)
    format_ok: bool        # control token, closed chain (think mode) and a non-empty \boxed{} answer
    answer: str | None     # content of the last \boxed{} of the answer part
    correct: bool
    error: str | None = None  # why the format is bad, or what went wrong while grading


def thinkless_reward(response, ground_truth, correct_short=1.0, correct_think=0.5, wrong=-1.0,
                     format_error=-1.0, is_equivalent=None) -> float:
    return score(reward_details(response, ground_truth, is_equivalent), correct_short, correct_think, wrong,
                 format_error)


def score(d: RewardDetails, correct_short=1.0, correct_think=0.5, wrong=-1.0, format_error=-1.0) -> float:
    """The reward table applied to already computed details (no second grading)."""
    if not d.format_ok:
        return format_error
    if not d.correct:
        return wrong
    return correct_short if d.mode == "short" else correct_think


def reward_details(response, ground_truth, is_equivalent=None) -> RewardDetails:
    """Parse mode and answer from `response` and grade it against `ground_truth` (str or list of str)."""
    if not isinstance(response, str):
        return RewardDetails(None, False, None, False, f"response must be a str, got {type(response).__name__}")
    if response.startswith(THINK):
        mode, rest = "think", response[len(THINK):]
        if END_THINK not in rest:
            return RewardDetails(mode, False, None, False, "think mode without </think> (truncated chain)")
        rest = rest.split(END_THINK, 1)[1]  # the final answer follows the (first) end of the chain
    elif response.startswith(SHORT):
        mode, rest = "short", response[len(SHORT):]
    else:
        return RewardDetails(None, False, None, False, "response does not start with <think> or <short>")
    answer = last_boxed(rest)
    if not answer:
        return RewardDetails(mode, False, None, False, "no \\boxed{} answer")
    golds = [ground_truth] if isinstance(ground_truth, str) else ground_truth
    if not isinstance(golds, (list, tuple)) or not golds or not all(isinstance(g, str) for g in golds):
        return RewardDetails(mode, True, answer, False,
                             f"ground truth must be a str or a non-empty list of str, got {ground_truth!r:.100}")
    correct, error = _grade(answer, list(golds), is_equivalent)
    return RewardDetails(mode, True, answer, correct, error)


# ----------------------------------------------------------------------------- answer extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} / `\\boxed x` in text; None if absent or unclosed."""
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2  # an escaped character (\{, \}, \\) neither opens nor closes
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j].strip()
            j += 1
        return None  # unclosed: a truncated box
    # "\boxed 5" (MATH style): up to the end of the math or of the line
    return re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip() or None


# ----------------------------------------------------------------------------- grading

def _normalize(s: str) -> str:
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\[,!;: ]|\s+", "", s)  # sizing and spacing commands
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"([_^]){(\w)}", r"\1\2", s)  # x^{2} -> x^2, E_{1} -> E_1
    return s.strip("$").rstrip(".")


def _grade(answer: str, golds: list[str], is_equivalent) -> tuple[bool, str | None]:
    if is_equivalent is not None:
        try:
            return any(bool(is_equivalent(answer, g)) for g in golds), None
        except Exception as e:  # a user grader must not crash the trainer either
            return False, f"is_equivalent raised {type(e).__name__}: {e}"[:300]
    if any(_normalize(answer) == _normalize(g) for g in golds):
        return True, None
    if len(answer) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} characters, not graded symbolically"
    return math_verify_equal(answer, golds)


def math_verify_equal(answer: str, golds: list[str]) -> tuple[bool, str | None]:
    """(answer equivalent to any gold by math-verify, error) in a worker process, within GRADE_TIMEOUT_S."""
    with _lock:
        worker = _idle.pop() if _idle else None
    try:
        worker = worker or _Worker()
        reply = worker.ask(json.dumps({"answer": answer, "golds": golds}), GRADE_TIMEOUT_S)
    except Exception as e:  # worker could not start, or died
        if worker is not None:
            worker.kill()
        return False, f"grader worker failed: {type(e).__name__}: {e}"[:300]
    if reply is None:
        worker.kill()
        return False, f"grading timed out after {GRADE_TIMEOUT_S} s"
    with _lock:
        _idle.append(worker)
    return reply["correct"], reply["error"]


class _Worker:
    """One `python rewards.py --grader-worker` child: a JSON request line in, a JSON reply line out."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-u", __file__, "--grader-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
        ready = self._read(WORKER_START_TIMEOUT_S)
        if ready != {"ready": True}:
            self.kill()
            raise RuntimeError(f"grader worker did not start: {ready or 'no reply in time'}")

    def ask(self, request: str, timeout: float):
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout: float):
        # The worker writes one short line per request in a single flush, so once the pipe is readable
        # readline() returns at once. None means the deadline passed.
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"grader worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


_idle: list[_Worker] = []  # started workers not in use; a caller takes one or starts a new one
_lock = threading.Lock()


def _forget_workers():
    # A forked child (a multiprocessing pool, a data loader) must not talk to its parent's workers
    # through the inherited pipes: it starts its own.
    global _lock
    _idle.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


@atexit.register
def _stop_workers():
    with _lock:
        for w in _idle:
            w.kill()
        _idle.clear()


def _worker_main():
    """Child process loop: grade requests from stdin with math-verify, its own (signal) timeout off."""
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints of libraries must not corrupt the protocol
    try:
        logging.disable(logging.WARNING)  # "Timeout is disabled ..." on every call
        from math_verify import parse, verify
    except Exception as e:
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return

    @lru_cache(maxsize=65536)  # the same ground truths come back G times per step
    def parse_boxed(s):
        return parse("\\boxed{" + s + "}", parsing_timeout=None)

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            golds = [parse_boxed(g) for g in req["golds"]]
            pred = parse_boxed(req["answer"])
            correct = bool(pred) and any(g and verify(g, pred, timeout_seconds=None) for g in golds)
            # math-verify falls back to the raw string when it finds no math: report, don't hide it
            bad = [g for g, p in zip(req["golds"], golds) if all(isinstance(x, str) for x in p)]
            error = f"ground truth not parsed as math by math-verify (string comparison only): {bad}" if bad else None
        except Exception as e:
            correct, error = False, f"math-verify raised {type(e).__name__}: {e}"
        out.write(json.dumps({"correct": correct, "error": error and error[:300]}) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--grader-worker"]:
    _worker_main()
