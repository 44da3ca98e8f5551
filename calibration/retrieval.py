"""Retrieval tasks shared by the accuracy harness and the server benchmark: the same token ids go
to both, so their scores can be compared prompt by prompt.

A task is a `RetrievalPrompt`: `context` (instructions and haystack text with the facts hidden in
it: the part a radix hit shares), `question` (what follows it) and `answer` (the ids a correct
greedy continuation starts with). Prompts are built from pieces tokenized separately and joined,
so `context` is exactly a prefix of `context + question` whatever the tokenizer merges. Every
prompt ends with the start of its answer sentence ("... The pass key is "), which makes the
answer the model's most likely continuation when it still sees the fact; scoring is exact match
of the greedy continuation (in the harness: argmax under teacher forcing, the same criterion).

Tasks (RULER's needle-in-a-haystack family, built from real text):
- passkey: one 5-digit key sentence at a chosen depth, asked for;
- multi-needle-one: several "special magic number for WORD" facts spread over the haystack,
  asked for one of them;
- multi-needle-all: the same facts, asked for all of them, in order of appearance (answered as
  "n1, n2, n3, n4");
- a conversation (`PromptBuilder.conversation`): the facts arrive in the first turn, later turns
  bring more text, the question comes last (the server benchmark adds the model's replies).
"""

import math
import zlib
from dataclasses import dataclass

import torch

from .datasets import DataError

TASKS = ("passkey", "multi-needle-one", "multi-needle-all")
INTRO = ("There is important information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_FACT = " The pass key is {value}. Remember it. {value} is the pass key. "
PASSKEY_ASK = "\n\nWhat is the pass key?"
PASSKEY_LEAD = "The pass key is "
NEEDLE_FACT = " One of the special magic numbers for {word} is: {value}. "
NEEDLE_ASK = "\n\nWhat is the special magic number for {word} mentioned in the provided text?"
NEEDLE_LEAD = "The special magic number for {word} is "
NEEDLE_ALL_ASK = ("\n\nWhat are the special magic numbers for {words} mentioned in the provided "
                  "text?")
NEEDLE_ALL_LEAD = "The special magic numbers for {words} are "
# common concrete nouns, one token-cheap word per fact
TURN_INTRO = "\n\nHere is more of the text:\n\n"
TURN_END = "\n\nSay OK when you have read it.\n"
NEEDLE_WORDS = ("apple", "river", "candle", "tiger", "violin", "garden", "rocket", "marble",
                "pepper", "castle", "anchor", "lantern")
DEPTH_RANGE = (0.05, 0.95)
WILSON_Z = 1.959963984540054  # two-sided 95 %


@dataclass(frozen=True)
class RetrievalPrompt:
    """One retrieval trial. Ids are token-id lists; `length` is the requested prompt length."""

    task: str
    length: int
    depth: float  # where the (first) fact sits, as a fraction of the haystack
    context: list[int]
    question: list[int]
    answer: list[int]

    @property
    def prompt(self) -> list[int]:
        return self.context + self.question


@dataclass(frozen=True)
class Proportion:
    """k successes of n trials with a Wilson 95 % interval."""

    successes: int
    trials: int

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else float("nan")

    def interval(self) -> tuple[float, float]:
        """Wilson score interval (low, high), in [0, 1]."""
        n = self.trials
        if n == 0:
            return float("nan"), float("nan")
        p, z2 = self.rate, WILSON_Z ** 2
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = WILSON_Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        # exact at the ends: rounding can leave centre - half a hair above 0 (3 trials, none right),
        # which would put the rate outside its own interval
        low = 0.0 if self.successes == 0 else max(0.0, centre - half)
        high = 1.0 if self.successes == n else min(1.0, centre + half)
        return low, high

    def text(self) -> str:
        """'85 % [71, 93]'"""
        lo, hi = self.interval()
        return f"{100 * self.rate:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"

    def as_dict(self) -> dict:
        lo, hi = self.interval()
        return {"successes": self.successes, "trials": self.trials, "rate": self.rate,
                "wilson95": [lo, hi]}


def depths(trials: int) -> list[float]:
    """`trials` depths evenly spread over DEPTH_RANGE."""
    lo, hi = DEPTH_RANGE
    return torch.linspace(lo, hi, trials).tolist() if trials > 1 else [(lo + hi) / 2]


@dataclass(frozen=True)
class ChatFrame:
    """Text around user messages: `head` before the first, `tail` after each (up to where the
    assistant's reply starts), `between` after a reply and before the next user message. The
    plain frame separates the pieces of bare text by white space."""

    head: str = ""
    tail: str = ""
    between: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatFrame":
        """The frame of the tokenizer's chat template (found by rendering sentinels)."""
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; use the plain prompt style")
        user, reply, user2 = "\x01USER\x01", "\x01REPLY\x01", "\x01USER2\x01"
        one = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                            add_generation_prompt=True)
        two = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": reply},
             {"role": "user", "content": user2}], tokenize=False, add_generation_prompt=True)
        head, tail = one.split(user)
        return cls(head, tail, two.split(reply)[1].split(user2)[0])


PLAIN_FRAME = ChatFrame(tail=" ", between="\n\n")
PROMPT_STYLES = ("chat", "plain")


class PromptBuilder:
    """Builds RetrievalPrompts from a tokenizer and a haystack token stream [N].

    style "chat" frames each prompt as one user message of the tokenizer's chat template with the
    answer's lead sentence opening the assistant's reply; "plain" uses bare text. Trial t of a
    length reads its haystack from its own offset of the stream (wrapping around), so trials do
    not share a haystack and a cold server run gets no radix hit beyond the instructions."""

    def __init__(self, tokenizer, haystack: torch.Tensor, style: str = "chat", needles: int = 4,
                 seed: int = 0):
        if needles < 1 or needles > len(NEEDLE_WORDS):
            raise DataError(f"needles must be in 1..{len(NEEDLE_WORDS)}, got {needles}")
        if style not in PROMPT_STYLES:
            raise DataError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
        self.tokenizer, self.haystack, self.needles = tokenizer, haystack, needles
        self.frame = ChatFrame.from_tokenizer(tokenizer) if style == "chat" else PLAIN_FRAME
        self.seed, self.generator = seed, torch.Generator().manual_seed(seed)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _number(self) -> str:
        return str(int(torch.randint(10000, 100000, (1,), generator=self.generator)))

    def _filler(self, trial: int, count: int) -> list[int]:
        n = self.haystack.numel()
        if count > n:
            raise DataError(f"a prompt needs {count} haystack tokens, the text has {n}")
        start = (trial * 7919) % n
        return torch.cat([self.haystack, self.haystack])[start:start + count].tolist()

    def _context(self, trial: int, length: int, facts: list[tuple[float, str]], reserve: int,
                 head: str) -> list[int]:
        """`head` + INTRO + haystack of the remaining budget with `facts` (depth, sentence)
        inserted at the sentence boundaries nearest their depths."""
        intro = self.ids(head) + self.ids(INTRO)
        fact_ids = [self.ids(text) for _, text in facts]
        budget = length - len(intro) - sum(map(len, fact_ids)) - reserve
        if budget < 16:
            raise DataError(f"prompt length {length} is too short for the instructions, "
                            f"{len(facts)} fact(s) and the question")
        text = self.tokenizer.decode(self._filler(trial, budget), clean_up_tokenization_spaces=False)
        cuts = [self._boundary(text, depth) for depth, _ in facts]
        pieces, last = [], 0
        for cut, ids in sorted(zip(cuts, fact_ids), key=lambda c: c[0]):
            pieces += self.ids(text[last:cut]) + ids
            last = cut
        return intro + pieces + self.ids(text[last:])

    @staticmethod
    def _boundary(text: str, depth: float) -> int:
        """Index just after the first ". " at or after `depth` of `text` (or the depth itself)."""
        at = int(depth * len(text))
        cut = text.find(". ", at)
        return at if cut < 0 else cut + 2

    def _question(self, ask: str, lead: str) -> list[int]:
        return self.ids(ask + self.frame.tail + lead)

    def _prompt(self, task: str, trial: int, length: int, depth: float, facts, ask: str,
                lead: str, answer: str) -> RetrievalPrompt:
        question, answer_ids = self._question(ask, lead), self.ids(answer)
        context = self._context(trial, length, facts, len(question) + len(answer_ids), self.frame.head)
        return RetrievalPrompt(task, length, depth, context, question, answer_ids)

    def passkey(self, trial: int, length: int, depth: float) -> RetrievalPrompt:
        key = self._number()
        return self._prompt("passkey", trial, length, depth, [(depth, PASSKEY_FACT.format(value=key))],
                            PASSKEY_ASK, PASSKEY_LEAD, key)

    def _needle_facts(self, depth: float) -> tuple[list[str], list[str], list[tuple[float, str]]]:
        """Words, values and (depth, sentence) of `needles` facts: the first at `depth`, the others
        evenly spaced after it, wrapping around DEPTH_RANGE."""
        order = torch.randperm(len(NEEDLE_WORDS), generator=self.generator)[:self.needles].tolist()
        words = [NEEDLE_WORDS[i] for i in order]
        values = [self._number() for _ in words]
        lo, hi = DEPTH_RANGE
        spots = [lo + ((depth - lo) + i * (hi - lo) / self.needles) % (hi - lo) for i in range(self.needles)]
        facts = [(d, NEEDLE_FACT.format(word=w, value=v)) for d, w, v in zip(spots, words, values)]
        return words, values, facts

    def multi_needle_one(self, trial: int, length: int, depth: float) -> RetrievalPrompt:
        """Ask for the fact placed at `depth` (the others are distractors)."""
        words, values, facts = self._needle_facts(depth)
        return self._prompt("multi-needle-one", trial, length, depth, facts,
                            NEEDLE_ASK.format(word=words[0]), NEEDLE_LEAD.format(word=words[0]), values[0])

    def multi_needle_all(self, trial: int, length: int, depth: float) -> RetrievalPrompt:
        """Ask for every fact, words listed and answered in order of appearance."""
        words, values, facts = self._needle_facts(depth)
        order = sorted(range(len(words)), key=lambda i: facts[i][0])
        words = _series([words[i] for i in order])
        return self._prompt("multi-needle-all", trial, length, depth, facts,
                            NEEDLE_ALL_ASK.format(words=words), NEEDLE_ALL_LEAD.format(words=words),
                            ", ".join(values[i] for i in order))

    def conversation(self, trial: int, turns: int, turn_length: int, depth: float) -> "Conversation":
        """A multi-turn agent conversation of `turns` user turns of about `turn_length` tokens:
        turn 0 holds the multi-needle facts (INTRO, haystack, facts at spread depths), every
        later turn TURN_INTRO + more haystack + TURN_END; the question, a last user turn, asks
        for the fact placed at `depth` of turn 0. Every turn but the first starts with the
        frame's `between` (the end of the model's reply); each ends with the frame's `tail`."""
        if turns < 1:
            raise DataError(f"a conversation needs at least one turn, got {turns}")
        words, values, facts = self._needle_facts(depth)
        end = self.ids(TURN_END + self.frame.tail)
        first = self._context(trial, turn_length, facts, len(end), self.frame.head) + end
        start = self.ids(self.frame.between + TURN_INTRO.lstrip("\n"))
        later = [start + self._filler(trial + 1000 * t, turn_length - len(start) - len(end)) + end
                 for t in range(1, turns)]
        question = self.ids(self.frame.between + NEEDLE_ASK.format(word=words[0]).lstrip("\n")
                            + self.frame.tail + NEEDLE_LEAD.format(word=words[0]))
        return Conversation(depth, [first, *later], question, self.ids(values[0]))

    def build(self, task: str, lengths: list[int], trials: int) -> list[RetrievalPrompt]:
        """`trials` prompts of `task` per length, depths spread over DEPTH_RANGE. The numbers of
        a (task, length) come from a generator seeded by (seed, task, length), so its prompts are
        the same whatever else is built."""
        make = {"passkey": self.passkey, "multi-needle-one": self.multi_needle_one,
                "multi-needle-all": self.multi_needle_all}.get(task)
        if make is None:
            raise DataError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
        prompts = []
        for n in lengths:
            self.generator.manual_seed(zlib.crc32(f"{self.seed}/{task}/{n}".encode()))
            prompts += [make(t, n, d) for t, d in enumerate(depths(trials))]
        return prompts


@dataclass(frozen=True)
class Conversation:
    """User turns (id lists) to send one after another, each after the model's reply to the
    previous one, then `question`; `answer` as in RetrievalPrompt."""

    depth: float
    turns: list[list[int]]
    question: list[int]
    answer: list[int]


def _series(items: list[str]) -> str:
    """'a, b, c and d'"""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def correct(prompt: RetrievalPrompt, continuation: list[int]) -> bool:
    """The greedy continuation starts with the answer's ids."""
    return list(continuation[:len(prompt.answer)]) == list(prompt.answer)
