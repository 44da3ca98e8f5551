"""Retrieval prompts shared by the harness and the server benchmark: structure, determinism,
chat framing, and the Wilson interval."""

import pytest
import torch
from transformers import AutoTokenizer

from oscar_sglang.calibration.datasets import DataError, token_stream
from oscar_sglang.calibration.retrieval import (
    NEEDLE_WORDS,
    TASKS,
    ChatFrame,
    PromptBuilder,
    Proportion,
    correct,
    depths,
)
from tiny_models import text_file, tiny_checkpoint

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_and_text(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint(d / "m"))
    return tok, token_stream(tok, [text_file(d / "t.txt", words=6000)])


@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("task", TASKS)
def test_prompts_hold_their_facts_and_end_at_the_answer(tokenizer_and_text, task, style):
    tok, stream = tokenizer_and_text
    tok.chat_template = CHATML
    prompts = PromptBuilder(tok, stream, style=style, needles=3).build(task, [700, 1500], 5)
    assert len(prompts) == 10 and [p.length for p in prompts] == [700] * 5 + [1500] * 5
    for p in prompts:
        assert p.task == task and p.prompt[:len(p.context)] == p.context
        assert abs(len(p.prompt) + len(p.answer) - p.length) <= 8
        context, question, answer = (tok.decode(x) for x in (p.context, p.question, p.answer))
        assert context.startswith("<|im_start|>" if style == "chat" else "There is important information")
        values = answer.split(", ")
        assert len(values) == (3 if task == "multi-needle-all" else 1)
        assert all(v.isdigit() and len(v) == 5 and v in context for v in values)
        assert not any(v in question for v in values)
        assert question.endswith(" is " if task != "multi-needle-all" else " are ")
        if style == "chat":
            assert "<|im_end|>\n<|im_start|>assistant\n" in question
        assert correct(p, p.answer + [1, 2]) and not correct(p, p.answer[:-1] + [p.answer[-1] + 1])
    # distinct haystacks per trial: a cold server run shares only the instructions
    assert len({tuple(p.context[60:200]) for p in prompts[:5]}) == 5


def test_fact_depth_and_multi_needle_order(tokenizer_and_text):
    tok, stream = tokenizer_and_text
    builder = PromptBuilder(tok, stream, style="plain", needles=4)
    shallow, deep = builder.passkey(0, 1200, 0.1), builder.passkey(0, 1200, 0.9)
    def where(p):
        text = tok.decode(p.context)
        return text.index(tok.decode(p.answer)) / len(text)
    assert where(shallow) < 0.25 and where(deep) > 0.75
    p = builder.multi_needle_all(1, 2000, 0.5)
    text = tok.decode(p.context)
    values = tok.decode(p.answer).split(", ")
    assert [text.index(v) for v in values] == sorted(text.index(v) for v in values)
    words = [w for w in NEEDLE_WORDS if f"numbers for {w} is" in text]
    assert len(words) == 4


def test_same_settings_same_prompts(tokenizer_and_text):
    tok, stream = tokenizer_and_text
    a = PromptBuilder(tok, stream, style="plain", seed=3).build("multi-needle-one", [600], 4)
    b = PromptBuilder(tok, stream, style="plain", seed=3).build("multi-needle-one", [600], 4)
    c = PromptBuilder(tok, stream, style="plain", seed=4).build("multi-needle-one", [600], 4)
    assert a == b and a != c
    # a (task, length) gives the same prompts whatever else is built
    both = PromptBuilder(tok, stream, style="plain", seed=3).build("multi-needle-one", [700, 600], 4)
    assert both[4:] == a


def test_conversation_turns(tokenizer_and_text):
    tok, stream = tokenizer_and_text
    tok.chat_template = CHATML
    conv = PromptBuilder(tok, stream, style="chat", needles=2).conversation(0, 3, 500, 0.3)
    assert len(conv.turns) == 3 and all(abs(len(t) - 500) <= 8 for t in conv.turns)
    first, later, question = tok.decode(conv.turns[0]), tok.decode(conv.turns[2]), tok.decode(conv.question)
    assert tok.decode(conv.answer) in first and tok.decode(conv.answer) not in later
    assert later.startswith("<|im_end|>\n<|im_start|>user\n") and later.endswith("<|im_start|>assistant\n")
    assert question.startswith("<|im_end|>\n<|im_start|>user\nWhat is the special magic number for")
    assert question.endswith(" is ")


def test_chat_frame_and_refusals(tokenizer_and_text):
    tok, stream = tokenizer_and_text
    tok.chat_template = CHATML
    assert ChatFrame.from_tokenizer(tok) == ChatFrame(
        "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n<|im_start|>user\n")
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        PromptBuilder(tok, stream, style="chat")
    with pytest.raises(DataError, match="too short"):
        PromptBuilder(tok, stream, style="plain").passkey(0, 40, 0.5)
    with pytest.raises(DataError, match="unknown retrieval task"):
        PromptBuilder(tok, stream, style="plain").build("needle", [500], 1)
    with pytest.raises(DataError, match="haystack tokens"):
        PromptBuilder(tok, stream[:100], style="plain").passkey(0, 500, 0.5)


def test_depths_spread():
    assert depths(1) == [0.5]
    d = depths(40)
    assert len(d) == 40 and d[0] == pytest.approx(0.05) and d[-1] == pytest.approx(0.95)


@pytest.mark.parametrize("k,n,low,high", [(0, 40, 0.0, 0.0876), (20, 40, 0.3520, 0.6480),
                                          (40, 40, 0.9124, 1.0), (9, 10, 0.5958, 0.9821)])
def test_wilson_interval(k, n, low, high):
    lo, hi = Proportion(k, n).interval()
    assert lo == pytest.approx(low, abs=5e-4) and hi == pytest.approx(high, abs=5e-4)
    assert Proportion(k, n).as_dict()["wilson95"] == [lo, hi]
    assert Proportion(20, 40).text() == "50 % [35, 65]"


def test_wilson_interval_separates_what_the_issue_needs():
    # at 40 trials the intervals of 95 % and 60 % do not overlap; those of 95 % and 75 % do
    assert Proportion(38, 40).interval()[0] > Proportion(24, 40).interval()[1]
    assert Proportion(38, 40).interval()[0] < Proportion(30, 40).interval()[1]
    assert torch.isnan(torch.tensor(Proportion(0, 0).rate))


@pytest.mark.parametrize("n", range(1, 60))
def test_rate_lies_inside_its_interval(n):
    """At 0 or n successes the interval ends exactly at the rate (3 trials once gave 5.6e-17 as
    the low end of 0 %, and the report's error bars failed on the negative length)."""
    for k in (0, 1, n - 1, n):
        lo, hi = Proportion(k, n).interval()
        assert lo <= Proportion(k, n).rate <= hi
    assert Proportion(0, n).interval()[0] == 0.0 and Proportion(n, n).interval()[1] == 1.0
