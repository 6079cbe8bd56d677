"""Chat-template facts the prompt code relies on (models.md §4).

Prompts are always rendered with the checkpoint's OWN ``chat_template`` (``render_chat``); the
constants here document what those templates produce, serve as the template of the tiny test
tokenizer, and give tests a Qwen3-style template to render with.

Qwen3 (§4.1): ``<|im_start|>user\\n{content}<|im_end|>\\n``; the generation prompt is
``<|im_start|>assistant\\n`` with thinking on (the model writes ``<think>…</think>`` itself) and
``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` with ``enable_thinking=False``.  Stop on
``<|im_end|>`` (151645) and ``<|endoftext|>`` (151643); ``</think>`` is 151668.  ``<think>`` and
``</think>`` are added but NOT special tokens, so they survive ``skip_special_tokens=True`` and the
reward's ``formatted`` metric can see them.

Olmo-3-Think (§4.2): ChatML-like; when the conversation has no system message the
template inserts a default one (``OLMO3_THINK_DEFAULT_SYSTEM``); the generation prompt already opens
the thinking block, ``<|im_start|>assistant\\n<think>`` (no newline), and ignores
``enable_thinking``.  ``<think>`` is plain text, not a token.  Stop on ``<|im_end|>`` (100265) and
``<|endoftext|>`` (100257); ``stop_token_ids`` adds ``<|im_end|>`` to the generation-config ids for
exactly this reason.  A decoded Olmo response therefore starts inside the thinking block and has
no opening ``<think>``.
"""

QWEN3_STOP_TOKEN_IDS = (151645, 151643)
QWEN3_THINK_END_ID = 151668

OLMO3_STOP_TOKEN_IDS = (100265, 100257)
OLMO3_THINK_GENERATION_PROMPT = "<|im_start|>assistant\n<think>"
OLMO3_THINK_DEFAULT_SYSTEM = (
    "You are OLMo, a helpful function-calling AI assistant built by Ai2. Your date cutoff is "
    "November 2024, and your model weights are available at https://huggingface.co/allenai. "
    "You do not currently have access to any functions. <functions></functions>"
)

END_OF_TURN_TOKEN = "<|im_end|>"
THINK_END = "</think>"

# The Qwen3 chat template without tool calling: system / user / assistant turns, reasoning split
# out of assistant history (kept only after the last user query), and ``enable_thinking``.
QWEN3_CHAT_TEMPLATE = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                                            .split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n')
                + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
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
