from transformers import AutoModelForCausalLM

from finetune_lab import models, prompts
from finetune_lab.config import PROMPT_FORMATS


def tokenizer():
    texts = ["hello there", "how are you", "fine thanks", "good morning"] * 5
    return models.load(models.tiny("causal_lm", texts, seed=0), AutoModelForCausalLM)[1]


def test_loss_on_output_masks_exactly_the_prompt():
    tok = tokenizer()
    for prompt_format in PROMPT_FORMATS:
        full = prompts.encode_pair(tok, "hello there", "fine thanks", prompt_format=prompt_format, loss_on="all",
                                   max_length=64)
        masked = prompts.encode_pair(tok, "hello there", "fine thanks", prompt_format=prompt_format,
                                     loss_on="output", max_length=64)
        prompt_len = len(tok(prompts.prompt_text(tok, "hello there", prompt_format), add_special_tokens=False)
                         ["input_ids"])
        assert full["input_ids"] == masked["input_ids"] and full["labels"] == full["input_ids"]
        assert masked["labels"][:prompt_len] == [prompts.IGNORE_INDEX] * prompt_len
        assert masked["labels"][prompt_len:] == full["input_ids"][prompt_len:]
        assert full["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(full["input_ids"][prompt_len:], skip_special_tokens=True) == "fine thanks"


def test_plain_format_is_input_newline_output_and_truncates():
    tok = tokenizer()
    pair = prompts.encode_pair(tok, "how are you", "good morning", prompt_format="plain", loss_on="all",
                               max_length=64)
    assert tok.decode(pair["input_ids"]) == "how are you\ngood morning" + tok.eos_token
    short = prompts.encode_pair(tok, "how are you", "good morning", prompt_format="plain", loss_on="output",
                                max_length=3)
    assert len(short["input_ids"]) == len(short["labels"]) == short["length"] == 3
