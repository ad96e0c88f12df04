"""How an input/output pair becomes training tokens, and an input becomes a generation prompt.

Training and generation must format the prompt identically, so both go through `prompt_text`.
- `plain` (the original recipe's, see docs/reference-experiments.md): the text is input + "\\n" + output, ended
  with the EOS token.
- `chat`: the tokenizer's chat template (user turn = input, assistant turn = output).
`loss_on="output"` masks the prompt tokens out of the loss (label -100); `"all"` trains on the whole text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_lab.models import eval_mode

if TYPE_CHECKING:  # registered models import this module to generate; they need no datasets
    import datasets

IGNORE_INDEX = -100  # label value the HF causal-LM loss skips


def prompt_text(tokenizer, user_input: str, prompt_format: str) -> str:
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_input}], add_generation_prompt=True, tokenize=False
        )
    return f"{user_input}\n"


def encode_pair(tokenizer, user_input: str, output: str, *, prompt_format: str, loss_on: str, max_length: int) -> dict:
    """Token ids, attention mask and labels for one pair; prompt and completion are tokenized separately so the
    boundary (and so the loss mask) is exact."""
    prompt_ids = tokenizer(prompt_text(tokenizer, user_input, prompt_format), add_special_tokens=False)["input_ids"]
    # Both formats end the reply with EOS (for ChatML models that is the end-of-turn token), so generation stops.
    completion_ids = tokenizer(f"{output}{tokenizer.eos_token or ''}", add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    masked = len(prompt_ids) if loss_on == "output" else 0
    labels = [IGNORE_INDEX] * min(masked, len(input_ids)) + input_ids[masked:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels, "length": len(input_ids)}


def tokenize_pairs(
    splits: datasets.DatasetDict, tokenizer, *, input_column: str, output_column: str, prompt_format: str,
    loss_on: str, max_length: int,
) -> datasets.DatasetDict:
    """Tokenize every split once (the sweep reuses the result for all its children)."""

    def encode(batch):
        rows = [
            encode_pair(tokenizer, i, o, prompt_format=prompt_format, loss_on=loss_on, max_length=max_length)
            for i, o in zip(batch[input_column], batch[output_column])
        ]
        return {key: [row[key] for row in rows] for key in rows[0]}

    columns = splits["train"].column_names
    return splits.map(encode, batched=True, remove_columns=columns, desc="tokenize")


def generate_reply(model, tokenizer, user_input: str, prompt_format: str, max_new_tokens: int) -> str:
    """Greedy reply to `user_input`, prompted exactly as in training; deterministic for a given model."""
    encoded = tokenizer(prompt_text(tokenizer, user_input, prompt_format), add_special_tokens=False,
                        return_tensors="pt").to(model.device)
    with eval_mode(model):
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
