"""Split a request into the ordered instructions it asks for, and build each step's prompt.

Pure text, no model: `chain` (router/chain.py) routes the pieces and decides which splits to keep.

- **Payload.** The data a request works on, when it is set apart from the instructions: after the
  first `": "` whose instruction part has at least three words ("Reverse the words and upper-case
  them: the cat sat"), or before a blank line ("the cat sat\\n\\nReverse the words above, then ...").
  It is never split, and it is the first step's input.
- **Segments.** The instruction part is cut at sequencing connectives ("then", "and then", "after
  that", "afterwards", "next", "finally", "followed by", "subsequently", "and" + a new clause,
  sentence ends, ";"), never inside quotes. Cuts are only candidates: the router keeps a cut when the
  two sides ask for different skills.
- **Routing a later step.** On its text with the reference to the previous answer made neutral
  (`neutral`): "express the total in words" is routed as "express this in words".
- **Carrying an answer.** Step k > 1 takes step k-1's answer as its data: the phrase that refers back
  to it ("the result", "the sum", "that number", "it", "of them", ...) leaves the instruction, and the
  answer follows it after a colon, the form experts are trained on ("write in upper case: Lisbon").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# a boundary that says "and after that": strong evidence of a sequence
_STRONG = (r"(?:,\s*|;\s*|\s+)(?:and\s+)?then\b,?\s*"
           r"|(?:[,;]\s*|\s+and\s+|\s+)(?:after\s+that|afterwards|subsequently)\b,?\s*"
           r"|(?:[,;]\s*|\s+and\s+|(?<=[.?!])\s+)(?:next|finally|lastly)\b,?\s*"
           r"|,?\s+followed\s+by\s+")
# a boundary that may join two instructions or two parts of one ("add 3 and 4"): kept only when
# the router finds a different skill on each side
_WEAK = r"(?<=;)\s*(?=\S)|(?<=[.?!])\s+(?=(?-i:[A-Z0-9\"“']))|\n+|,?\s+and\s+(?!then\b)"
_BOUNDARY = re.compile(f"(?P<strong>{_STRONG})|(?P<weak>{_WEAK})", re.IGNORECASE)
_LEAD = re.compile(r"^(?:(?:first(?:ly)?|to\s+start|then|next|after\s+that|afterwards|finally|lastly|and)\b,?\s*)+",
                   re.IGNORECASE)
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|'[^'\n]{2,}'(?=[\s,.;:?!]|$)")
_COLON = re.compile(r":\s+")

# phrases that stand for the previous step's answer, most specific first
_NOUNS = (r"result|answer|output|outcome|sum|total|product|difference|count|number|value|name|city|list|"
          r"sentence|text|string|words|date|figure|word\s+count|capital")
_BACK_REFS = [
    re.compile(rf"\b(?:the|that|this|your)\s+(?:resulting|new|final|previous|reversed|sorted|converted)\s+(?:{_NOUNS})\b",
               re.IGNORECASE),
    re.compile(rf"\b(?:the|that|this|your)\s+(?:{_NOUNS})\b", re.IGNORECASE),
    re.compile(r"\bthe\s+resulting\s+\w+\b", re.IGNORECASE),
    re.compile(r"\b(?:it|them|that|this)\b", re.IGNORECASE),
]


@dataclass(frozen=True)
class Segment:
    text: str            # the instruction, without its connective
    start: int           # its span in the instruction part
    end: int
    boundary: str        # the boundary before it: "" (first), "strong" or "weak"


@dataclass(frozen=True)
class Parts:
    instruction: str
    payload: str | None = None
    form: str = ""       # "colon" (instruction: payload) | "lead" (payload, blank line, instruction) | ""


def _masked(text: str) -> str:
    """`text` with quoted spans blanked (same length), so nothing inside quotes is cut."""
    return _QUOTED.sub(lambda m: "\x00" * len(m.group(0)), text)


def split_payload(query: str) -> Parts:
    text = query.strip()
    masked = _masked(text)
    lead = masked.find("\n\n")
    if lead > 0:
        head, tail = text[:lead].strip(), text[lead:].strip()
        # data first: the instruction is the last paragraph and refers to the data
        if tail and "\n\n" not in masked[lead + 2:].strip() and re.search(r"\b(above|previous|this|that|these)\b",
                                                                           tail, re.IGNORECASE):
            return Parts(tail, head, "lead")
    for m in _COLON.finditer(masked):
        before, after = text[:m.start()].strip(), text[m.end():].strip()
        if len(before.split()) >= 3 and after:
            return Parts(before, after, "colon")
    return Parts(text)


def segments(instruction: str) -> list[Segment]:
    """Candidate steps, in order, cut at every connective outside quotes."""
    masked = _masked(instruction)
    out, start, kind = [], 0, ""
    for m in _BOUNDARY.finditer(masked):
        if m.start() <= start:
            continue
        out.append((start, m.start(), kind))
        start, kind = m.end(), ("strong" if m.group("strong") else "weak")
    out.append((start, len(instruction), kind))
    segs = []
    for s, e, k in out:
        raw = instruction[s:e]
        lead = _LEAD.match(raw)
        if lead:
            s, raw = s + lead.end(), raw[lead.end():]
        text = raw.strip().rstrip(",;")
        if text:
            segs.append(Segment(text, s, e, k))
    return segs


def refers_back(text: str) -> bool:
    return any(p.search(_masked(text)) for p in _BACK_REFS)


_LABEL = re.compile(r"^\s*[A-Za-z]+(?:\s+[A-Za-z]+)?:\s")


def is_instruction(text: str) -> bool:
    """Two words or more, one of them a word of letters after any leading label: "367.", "notation?"
    and "Numbers: 3, 1" are data, not steps."""
    body = _LABEL.sub("", _masked(text), count=1)
    return len(body.split()) >= 2 and re.search(r"[A-Za-z]{3,}", body) is not None


def neutral(text: str) -> str:
    """`text` with its reference to the previous answer replaced by "this", for routing: what a step
    does is in its verb ("spell out ... in words"), and the name of what it works on ("the sum", "the
    product") would pull the router back to the step that made it."""
    masked = _masked(text)
    for p in _BACK_REFS[:3]:
        m = p.search(masked)
        if m:
            return text[:m.start()] + "this" + text[m.end():]
    return text


def carry(step_text: str, answer: str) -> str:
    """Step k's prompt from its instruction and step k-1's answer: the instruction without its reference
    to the answer (and that reference's preposition), then a colon and the answer, the form the experts
    are trained on ("Convert to upper case: {s}"); an answer written into the sentence ("write Copenhagen
    in upper case") is often taken by an expert as part of the text to transform."""
    masked = _masked(step_text)
    for p in _BACK_REFS:
        m = p.search(masked)
        if m:
            head = re.sub(r"\s+(?:of|on|to|for|from|in|into)\s*$", "", step_text[:m.start()], flags=re.IGNORECASE)
            step_text = f"{head} {step_text[m.end():].lstrip()}"
            break
    instruction = " ".join(step_text.split()).rstrip(" .:,;")
    return f"{instruction}: {' '.join(answer.split())}"


def first_prompt(step_text: str, parts: Parts) -> str:
    """The first step's prompt: its instruction with the request's payload, if the payload was set apart."""
    if parts.payload is None:
        return step_text
    if parts.form == "lead":
        return f"{parts.payload}\n\n{step_text}"
    if step_text.rstrip().endswith(("?", ".")):
        return f"{step_text.rstrip()} {parts.payload}"
    return f"{step_text.rstrip()}: {parts.payload}"
