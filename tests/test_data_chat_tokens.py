"""Loss masks derived from the chat template itself: SmolLM2 (ChatML), Qwen-style ChatML with a
default system prompt, Llama-3 style headers, a Gemma-style template that renames the assistant
role, and a plain-text template that ignores add_generation_prompt."""
from __future__ import annotations

import copy

import pytest

from scylla.data.chat_tokens import tokenize_conversation, tokenize_conversations
from scylla.errors import DataError
from scylla.modeling.targets import load_tokenizer

# Written for these tests (equivalent in behaviour to the families they are named after).
QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\nYou are a careful assistant made for tests.<|im_end|>\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
LLAMA3_STYLE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set sys = messages[0]['content'] | trim -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{%- set sys = 'Knowledge cutoff: 2023-12' -%}{%- set rest = messages -%}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' + sys + '<|eot_id|>' -}}"
    "{%- for m in rest -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim)"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- endif -%}"
)
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Gemma style: the assistant is called "model" and a system message is folded into the
# first user turn.
GEMMA_STYLE = (
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.prefix = m['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else 'user' -%}"
    "{{- '<start_of_turn>' + role + '\n' + ns.prefix + m['content'] + '<end_of_turn>\n' -}}"
    "{%- set ns.prefix = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
GEMMA_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
# No special header tokens, and add_generation_prompt is ignored: the header of an assistant
# turn is plain text that the mask must still leave out.
PLAIN_STYLE = (
    "{%- for m in messages -%}"
    "{{- '### ' + m['role'] + ':\n' + m['content'] -}}"
    "{%- if m['role'] == 'assistant' -%}{{- '<|endoftext|>' -}}{%- endif -%}"
    "{{- '\n\n' -}}"
    "{%- endfor -%}"
)

CONV = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4.\n\nAnything else?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome - user: assistant: <b>bye</b>"},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}] + CONV[:4]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2-135m-instruct")


def variant(base, template, new_tokens=()):
    tok = copy.deepcopy(base)
    if new_tokens:
        tok.add_tokens(list(new_tokens), special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tokenizers(smollm2):
    return {
        "smollm2": (smollm2, "<|im_end|>"),
        "qwen": (variant(smollm2, QWEN_STYLE), "<|im_end|>"),
        "llama3": (variant(smollm2, LLAMA3_STYLE, LLAMA3_TOKENS), "<|eot_id|>"),
        "gemma": (variant(smollm2, GEMMA_STYLE, GEMMA_TOKENS), "<end_of_turn>"),
        "plain": (variant(smollm2, PLAIN_STYLE), "<|endoftext|>"),
    }


def masked_runs(ids, mask):
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def template_ids(tok, conv):
    out = tok.apply_chat_template(conv, tokenize=True)
    # transformers 5 returns a BatchEncoding here, older versions a list
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2", "qwen", "llama3", "gemma", "plain"])
@pytest.mark.parametrize("conv", [CONV, WITH_SYSTEM], ids=["multi-turn", "system"])
def test_mask_covers_exactly_the_assistant_replies_and_their_end_marker(tokenizers, name, conv):
    tok, end = tokenizers[name]
    ids, mask = tokenize_conversation(tok, conv, max_len=4096)
    assert ids == template_ids(tok, conv)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    runs = [tok.decode(r, skip_special_tokens=False) for r in masked_runs(ids, mask)]
    want = [m["content"] + end for m in conv if m["role"] == "assistant"]
    assert runs == want
    # nothing of the system prompt, user turns or role headers is masked
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    for m in conv:
        if m["role"] != "assistant":
            assert m["content"] in unmasked


@pytest.mark.real
def test_template_that_trims_content_masks_the_trimmed_text(tokenizers):
    tok, end = tokenizers["llama3"]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  padded  \n"}]
    ids, mask = tokenize_conversation(tok, conv, max_len=4096)
    assert [tok.decode(r, skip_special_tokens=False) for r in masked_runs(ids, mask)] == [
        "padded" + end]


@pytest.mark.real
def test_max_len_cuts_ids_and_mask_together(tokenizers):
    tok, _ = tokenizers["smollm2"]
    full_ids, full_mask = tokenize_conversation(tok, CONV, max_len=4096)
    ids, mask = tokenize_conversation(tok, CONV, max_len=40)
    assert ids == full_ids[:40] and mask == full_mask[:40]
    batch = tokenize_conversations(tok, [CONV, WITH_SYSTEM], max_len=4096)
    assert batch[0] == (full_ids, full_mask)
    assert batch[1] == tokenize_conversation(tok, WITH_SYSTEM, max_len=4096)


@pytest.mark.real
def test_templates_that_cannot_give_a_mask_are_refused(smollm2):
    unstable = variant(smollm2, (
        "{%- for m in messages -%}"
        "{{- m['role'] + ': ' + m['content'] + ('\n' if loop.last else ' | ') -}}"
        "{%- endfor -%}"))
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_conversation(unstable, CONV, max_len=512)
    rewriting = variant(smollm2, "{%- for m in messages -%}{{- m['content'] | upper -}}"
                                 "{%- endfor -%}")
    with pytest.raises(DataError, match="changes the text of assistant message 1"):
        tokenize_conversation(rewriting, CONV[:2], max_len=512)
    none = copy.deepcopy(smollm2)
    none.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversation(none, CONV, max_len=512)
    with pytest.raises(DataError, match="max_len=0"):
        tokenize_conversation(smollm2, CONV, max_len=0)
