"""Tokenization: EOS, loss masks of plain text and of chat under default and Jinja templates."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from flare_jax.data.chat import chatml
from flare_jax.data.records import Message, Record
from flare_jax.data.tokenize import DocumentTokenizer

CHAT = Record(messages=(
    Message("system", "be brief"), Message("user", "hello world"), Message("assistant", "the fox"),
    Message("user", "how are you?"), Message("assistant", "lazy dog"),
))

# Qwen3-style: the last assistant turn carries (empty) think tags the earlier ones lack.
THINK_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{ m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A generation prompt the rendered turns do not start with: spans fall back to the content.
PROMPT_MISMATCH_TEMPLATE = THINK_TEMPLATE.replace(
    "assistant\\n' }}{%- endif %}", "assistant\\n<x>' }}{%- endif %}"
)


def _trained_text(tok: DocumentTokenizer, record: Record) -> str:
    out = tok(record)
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == bool
    return tok.tokenizer.decode(out["tokens"][out["loss_mask"]].tolist(), skip_special_tokens=False)


def test_plain_text_trains_on_everything_and_appends_eos(tokenizer_dir):
    tok = DocumentTokenizer.from_dir(tokenizer_dir)
    out = tok(Record(text="the quick brown fox"))
    ids = tok.tokenizer.encode("the quick brown fox", add_special_tokens=False).ids
    eos = tok.tokenizer.token_to_id("<|endoftext|>")
    np.testing.assert_array_equal(out["tokens"], [*ids, eos])
    assert out["loss_mask"].all()


def test_default_chatml_masks_only_assistant_turns(tokenizer_dir):
    tok = DocumentTokenizer.from_dir(tokenizer_dir)
    out = tok(CHAT)
    full = tok.tokenizer.decode(out["tokens"].tolist(), skip_special_tokens=False)
    assert full == chatml(CHAT.messages, False) + "<|endoftext|>"
    assert _trained_text(tok, CHAT) == "the fox<|im_end|>\nlazy dog<|im_end|>\n<|endoftext|>"
    # A conversation ending on a user turn does not train the appended EOS.
    ends_with_user = Record(messages=CHAT.messages[:4])
    assert _trained_text(tok, ends_with_user) == "the fox<|im_end|>\n"


def test_jinja_template_from_config_trains_template_inserted_text(tokenizer_dir, tmp_path):
    shutil.copy(f"{tokenizer_dir}/tokenizer.json", tmp_path)
    config = {"eos_token": {"content": "<|endoftext|>"}, "chat_template": THINK_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = DocumentTokenizer.from_dir(str(tmp_path))
    expected = "the fox<|im_end|>\n<think>\n\n</think>\n\nlazy dog<|im_end|>\n<|endoftext|>"
    assert _trained_text(tok, CHAT) == expected
    # chat_template.jinja takes precedence over the config's template.
    (tmp_path / "chat_template.jinja").write_text(PROMPT_MISMATCH_TEMPLATE)
    tok = DocumentTokenizer.from_dir(str(tmp_path))
    full = tok.tokenizer.decode(tok(CHAT)["tokens"].tolist(), skip_special_tokens=False)
    assert "<x>" not in full and "<think>" in full
    assert _trained_text(tok, CHAT) == "the fox<|im_end|>\nlazy dog<|im_end|>\n<|endoftext|>"


def test_from_dir_errors(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        DocumentTokenizer.from_dir(str(tmp_path))
    shutil.copy(f"{tokenizer_dir}/tokenizer.json", tmp_path)
    with pytest.raises(ValueError, match="names no eos_token"):
        DocumentTokenizer.from_dir(str(tmp_path))
    with pytest.raises(ValueError, match="'<eos>' is not in the vocabulary"):
        DocumentTokenizer.from_dir(str(tmp_path), eos_token="<eos>")
    assert DocumentTokenizer.from_dir(str(tmp_path), eos_token="<|im_end|>").eos_id == 2
    bare = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="ChatML template needs special tokens"):
        DocumentTokenizer(bare, eos_id=1)
