"""Prompts (algorithm.md §1.2, §2.1), chat rendering (models.md §4.1), tiny tokenizer, stop ids."""

import json
import os
import shutil

import numpy as np
import pytest

from rlcsd_jax.data import (
    Record,
    build_tiny_tokenizer,
    encode_prompt,
    filter_long_prompts,
    is_train_source,
    load_tokenizer,
    render_chat,
    stop_token_ids,
    strip_legacy_wrappers,
    student_prompt,
    student_user_message,
    teacher_prompt,
    teacher_user_message,
)
from rlcsd_jax.data.chat_templates import QWEN3_CHAT_TEMPLATE
from rlcsd_jax.data.knights_knaves import generate_puzzle

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."

# The official Qwen3 template's non-tool branches, verbatim (tools / tool turns omitted).  The
# simplified QWEN3_CHAT_TEMPLATE must render every system/user/assistant conversation the same.
OFFICIAL_QWEN3_NO_TOOLS = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(params=["tiny", "qwen3_official"])
def any_tok(request, tok, tok_dir):
    """The tiny tokenizer with its own template, and with the official Qwen3 template."""
    if request.param == "tiny":
        return tok
    other = load_tokenizer(tok_dir)
    other.chat_template = OFFICIAL_QWEN3_NO_TOOLS
    return other


def test_student_messages_match_spec():
    assert student_user_message("What is 2+2?", "deepmath_filtered_level6_8") == (
        f"Problem: What is 2+2?\n\n{BOXED}"
    )
    assert student_user_message("What is 2+2?", "kk_4to8") == f"Problem: What is 2+2?\n\n{BOXED}"
    for eval_source in ("amc23", "aime24", "aime25", "kk_4to8_test", "kk_9", "kk_11"):
        assert student_user_message("What is 2+2?", eval_source) == f"What is 2+2?\n\n{BOXED}"
    assert is_train_source("DeepMath_Filtered_Level7_10")
    assert not is_train_source("deepmath")
    assert student_user_message("Q", "mine", train_sources=("mine",)) == f"Problem: Q\n\n{BOXED}"


def test_teacher_message_matches_spec_exactly():
    expected = (
        "Problem: Find x.\n\nHere is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\nx = 3 because 2x = 6.\n\nCorrect final answer: 3\n"
        "=== Reference Solution End ===\n\nAfter reading the reference solution above, make sure "
        "you understand the reasoning behind each step.\n\nPlease reason step by step, and put "
        "your final answer within \\boxed{}."
    )
    assert teacher_user_message("Find x.", "  x = 3 because 2x = 6.\n", " 3 ") == expected
    assert "=== Reference Solution Begin ===\nCorrect final answer: 3\n===" in (
        teacher_user_message("Find x.", None, "3", mode="answer_only")
    )
    with pytest.raises(ValueError, match="needs a solution"):
        teacher_user_message("Find x.", None, "3")


def test_rendered_student_and_teacher_prompts(any_tok):
    record = Record("What is 2+2?", "4", "deepmath_filtered_level5_7", 0)
    assert student_prompt(any_tok, record) == (
        f"<|im_start|>user\nProblem: What is 2+2?\n\n{BOXED}<|im_end|>\n<|im_start|>assistant\n"
    )
    eval_record = Record("What is 2+2?", "4", "aime25", 0)
    assert student_prompt(any_tok, eval_record) == (
        f"<|im_start|>user\nWhat is 2+2?\n\n{BOXED}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert teacher_prompt(any_tok, "Q", "S", "A") == (
        f"<|im_start|>user\n{teacher_user_message('Q', 'S', 'A')}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_enable_thinking_switches_the_generation_prompt(any_tok):
    on = render_chat(any_tok, "Hi", enable_thinking=True)
    off = render_chat(any_tok, "Hi", enable_thinking=False)
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
            {"role": "user", "content": "2+2?"},
        ],
        [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
        ],
        [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2", "reasoning_content": "easy"},
        ],
    ],
)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_simplified_qwen3_template_matches_official(tok, messages, generation_prompt):
    for thinking in (True, False):
        kwargs = dict(
            tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=thinking
        )
        ours = tok.apply_chat_template(messages, chat_template=QWEN3_CHAT_TEMPLATE, **kwargs)
        official = tok.apply_chat_template(
            messages, chat_template=OFFICIAL_QWEN3_NO_TOOLS, **kwargs
        )
        assert ours == official


def test_template_without_enable_thinking_ignores_it(tok):
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}"
    )
    kw = dict(chat_template=chatml)
    assert (
        render_chat(tok, "Hi", True, **kw)
        == render_chat(tok, "Hi", False, **kw)
        == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>")
    )


THINKING = ("Please first think step by step inside <think>...</think> tags, and then put your "
            "final answer within \\boxed{}.")
DAPO = ("Solve the following math problem step by step. The last line of your response should be "
        "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
DAPO_REMINDER = 'Remember to put your answer on its own line after "Answer:".'


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"Problem: Find x.\n\n{BOXED}", "Find x."),
        (f"Find x.\n\n{BOXED}", "Find x."),
        (f"  Problem:  Find x. \n\n{BOXED}\n", "Find x."),
        (f"Problem: Find x.\n\n{THINKING}", "Find x."),
        (f"Find x.\n\n{THINKING}", "Find x."),
        ("Problem: Find x.", "Problem: Find x."),  # no instruction: the prefix is part of the text
        (f"Find x. {BOXED}", f"Find x. {BOXED}"),  # the instruction must follow a blank line
        (f"{DAPO}\n\n{DAPO_REMINDER}\n\nFind x.", "Find x."),   # the reference's DAPO form
        # ... only that form: a problem between the two sentences stays as it is (as there)
        (f"{DAPO}\n\nFind x.\n\n{DAPO_REMINDER}", f"{DAPO}\n\nFind x.\n\n{DAPO_REMINDER}"),
        # one wrapper is removed per call
        (f"Problem: Find x.\n\n{BOXED}\n\n{BOXED}", f"Find x.\n\n{BOXED}"),
        ("  Find x.  ", "Find x."),
        (None, ""),
    ],
)
def test_strip_legacy_wrappers(text, expected):
    assert strip_legacy_wrappers(text) == expected


KK_QUIZ = ("A very special island is inhabited only by knights and knaves. Knights always tell the "
           "truth, and knaves always lie. You meet 2 inhabitants: Zoey, and Ella. Zoey said that "
           '"Ella is a knave." Ella said, "Zoey is a knight." So who is a knight and who is a knave?')
MATH = "Let $x^2 = 16$ with $x > 0$. Find $x$."


@pytest.mark.parametrize("problem", [KK_QUIZ, MATH])
@pytest.mark.parametrize("form", ["plain", "instruction", "problem_prefix", "twice"])
@pytest.mark.parametrize("source,train", [("kk_4to8", True), ("kk_9", False),
                                          ("kk_4to8_test", False),
                                          ("deepmath_filtered_level6_8", True),
                                          ("aime24", False)])
def test_student_message_from_the_cleaned_problem(problem, form, source, train):
    """algorithm.md §1.2: the problem text may already carry the instruction (the reference's K&K
    puzzles do) or a whole stored prompt; the student message states it exactly once."""
    stored = {"plain": problem, "instruction": f"{problem}\n\n{BOXED}",
              "problem_prefix": f"Problem: {problem}\n\n{BOXED}",
              "twice": f"Problem: {problem}\n\n{BOXED}\n\n{BOXED}"}[form]
    message = student_user_message(stored, source)
    assert message == (f"Problem: {problem}" if train else problem) + f"\n\n{BOXED}"
    assert message.count(BOXED) == 1


def test_student_prompt_of_a_read_row_states_the_instruction_once(tmp_path, tok):
    """From a verl row to the rendered prompt: a wrapped extra_info.problem, and an empty one
    that falls back to the stored prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlcsd_jax.data import read_verl_parquet

    rows = [{"data_source": source, "prompt": [{"role": "user", "content": prompt}],
             "reward_model": {"ground_truth": "x"},
             "extra_info": {"index": i, "problem": problem}}
            for i, (source, problem, prompt) in enumerate([
                ("kk_4to8", f"{KK_QUIZ}\n\n{BOXED}", f"Problem: {KK_QUIZ}\n\n{BOXED}"),
                ("kk_9", "", f"{KK_QUIZ}\n\n{BOXED}"),
                ("deepmath_filtered_level5_7", "", f"Problem: {MATH}\n\n{BOXED}"),
                ("aime24", f"{MATH}\n\n{BOXED}", "unused")])]
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_verl_parquet(path)
    for record, train in zip(records, (True, False, True, False)):
        text = student_prompt(tok, record)
        assert text.count(BOXED) == 1, text
        assert text.count("Problem: ") == int(train), text


def test_long_prompts_are_filtered_with_a_count(tok):
    records = [
        Record("short", "1", "aime24", 0),
        Record("word " * 300, "1", "aime24", 1),
        Record("mid " * 20, "1", "kk_4to8", 2),
    ]
    lengths = [len(encode_prompt(tok, student_prompt(tok, r))) for r in records]
    limit = lengths[2]
    assert lengths[0] < limit < lengths[1]
    kept, dropped = filter_long_prompts(records, tok, limit)  # a prompt of exactly limit is kept
    assert (kept, dropped) == ([records[0], records[2]], 1)
    assert filter_long_prompts(records, tok, limit - 1) == ([records[0]], 2)
    assert filter_long_prompts([], tok, 10) == ([], 0)


def test_stop_ids_from_generation_config(tok_dir, tok, tmp_path):
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(tok_dir) == [im_end, endoftext]
    assert stop_token_ids(tok) == [im_end, endoftext]  # found through tokenizer.name_or_path
    other = tmp_path / "model"
    shutil.copytree(tok_dir, other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext}))
    assert stop_token_ids(str(other), include_end_of_turn=False) == [endoftext]
    assert stop_token_ids(str(other)) == [endoftext, im_end]  # ChatML end of turn added
    os.remove(other / "generation_config.json")
    assert stop_token_ids(str(other)) == [tok.eos_token_id]  # tokenizer eos = <|im_end|>


def test_tiny_tokenizer_round_trips_exactly(tok):
    texts = [
        "Problem: Solve $x^2 - 5x + 6 = 0$.\n\nSo \\boxed{\\frac{1}{2}}, 1,000 and -3.25",
        "<think>\nAssume Alice is a knight.\n</think>\n\n\\boxed{Alice is a knight}",
        "tabs\tand  double  spaces\n\n\nnewlines  ",
        "unicode: café, 日本語, −5, 90°, emoji 🙂, ∑_{i=1}^{n} i",
    ]
    texts += [generate_puzzle(n, np.random.default_rng(n)).reasoning for n in (3, 9)]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok) <= 512


def test_tiny_tokenizer_special_tokens(tok):
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"])
    assert ids == [0, 1, 2, 3]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 3
    think = tok.encode("<think></think>", add_special_tokens=False)
    assert len(think) == 2  # single tokens, like Qwen3's
    # <think>/</think> survive skip_special_tokens (the reward's `formatted` metric needs them).
    text = "<|im_start|>assistant\n<think>x</think>y<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == (
        "assistant\n<think>x</think>y"
    )


def test_tiny_tokenizer_is_deterministic(tok_dir, tmp_path):
    again = build_tiny_tokenizer(str(tmp_path / "again"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(tok_dir, name)) as a, open(os.path.join(again, name)) as b:
            assert a.read() == b.read()


def test_tiny_tokenizer_vocab_size_is_a_cap(tok_dir, tmp_path):
    # More entries shorten K&K prompts (configs/tiny.py uses 768); the BPE trainer stops early
    # once the corpus has no pair left to merge, so the size is a cap, not a promise.
    small = load_tokenizer(tok_dir)                       # the default, 512
    mid = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "v768"), vocab_size=768))
    big = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "v4096"), vocab_size=4096))
    assert (len(small), len(mid)) == (512, 768) and 768 < len(big) < 4096
    text = "A very special island is inhabited only by knights and knaves."
    assert len(mid.encode(text)) < len(small.encode(text))
    assert big.convert_tokens_to_ids(["<think>", "</think>"]) == [len(big) - 2, len(big) - 1]
