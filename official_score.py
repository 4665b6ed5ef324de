"""The official evaluation's scoring (THINKLESS.md section 5), to compare with the paper's table.

The official scripts (after lm_eval with vLLM) grade a response with no format check at all:
  1. answer: the LAST balanced `\\boxed{...}` anywhere in the response, the thinking included; if
     there is none, the content of the last `<answer>...</answer>` tags; if none, the last number;
  2. correct: the answer equals a ground truth after the Hendrycks-MATH normaliser (strip_string
     below), or is equivalent to it symbolically (here math-verify, in rewards.py's guarded worker
     processes, where the official scripts call sympy);
  3. tokens: the length of the templated conversation, prompt included (eval.py counts it);
  4. think: `<think>` anywhere in the response.
So a truncated chain whose thinking boxed the right number is correct here and a format error for
the RL reward (rewards.py, eval.py's `strict` column); a response without any box still scores when
its last number is right. Written from the description of the official behaviour, not copied.
"""

import re

from rewards import MAX_ANSWER_CHARS, THINK, last_boxed, math_verify_equal

_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(response: str) -> str | None:
    """The official fallbacks: last balanced \\boxed{} anywhere, else last <answer> tags, else last number."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAGS.findall(response)
    if tags:
        return tags[-1].strip()
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", response))  # 1,000 -> 1000
    return numbers[-1] if numbers else None


def thinks(response: str) -> bool:
    return THINK in response


def is_correct(response, ground_truth, is_equivalent=None) -> tuple[str | None, bool]:
    """(extracted answer, correct) of a response against a ground truth (str or list of str).
    is_equivalent(answer, truth), when given, replaces the normaliser and math-verify (toy tasks)."""
    answer = extract_answer(response) if isinstance(response, str) else None
    golds = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
    if answer is None or not golds:
        return answer, False
    if is_equivalent is not None:
        return answer, any(bool(is_equivalent(answer, g)) for g in golds)
    if any(strip_string(answer) == strip_string(str(g)) for g in golds):
        return answer, True
    if len(answer) > MAX_ANSWER_CHARS:
        return answer, False
    return answer, math_verify_equal(answer, [str(g) for g in golds])[0]


# -----------------------------------------------------------------------------
# The Hendrycks-MATH normaliser (the MATH benchmark's equivalence check), rule by rule


def strip_string(s: str) -> str:
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units on the right: "5 \\text{ cm}" -> "5 "
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")  # " .5" -> " 0.5"
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> "5", "k=2" -> "2"
        s = sides[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt3 -> \sqrt{3}
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(\d+)/(\d+)", s)  # 3/4 -> \frac{3}{4} (integers only)
    return f"\\frac{{{m[1]}}}{{{m[2]}}}" if m else s


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\frac{1}2 -> \\frac{1}{2}."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:  # "\\frac" followed by less than two characters: left as it is
            return s
        a, b, rest = part[0], part[1], part[2:]
        out += f"{{{a}}}{b}{rest}" if b == "{" else f"{{{a}}}{{{b}}}{rest}"
    return out
