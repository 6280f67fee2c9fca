"""A fine-tuned adapter, served through the real platform, behaves as it did in training.

Training and serving agree: the format learned on the tiny model shows up
through Serve + vLLM, and the served tokens equal PEFT's greedy tokens.
"""

from __future__ import annotations

import re

import pytest

from testkit.synthetic import FORMAT_REGEX, format_examples, write_jsonl

pytestmark = pytest.mark.integration

MAX_TOKENS = 16


def _user_prompts(rows) -> list[str]:
    return [
        r["messages"][-2]["content"] if "messages" in r else r["prompt"] for r in rows
    ]


@pytest.fixture(scope="module")
def finetuned(platform, tmp_path_factory):
    from hybridserve.finetune import TrainConfig, finetune

    data = write_jsonl(tmp_path_factory.mktemp("ft") / "train.jsonl", format_examples(80))
    result = finetune(
        platform.main,
        data,
        "ok-format",
        TrainConfig(steps=40, lr=1e-2, format_regex=FORMAT_REGEX, eval_max_new_tokens=MAX_TOKENS),
        progress=lambda *_: None,
    )
    assert result.eval.beats_base
    # Prompts the adapter never saw (another seed of the same generator).
    seen = set(_user_prompts(format_examples(80)))
    held_out = [p for p in _user_prompts(format_examples(40, seed=99)) if p not in seen][:10]
    assert len(held_out) >= 5
    return result, held_out


def _served(client, prompt: str, adapter: str = ""):
    text, ids, _ = client.generate(
        messages=[("user", prompt)], adapter=adapter, max_tokens=MAX_TOKENS, temperature=0
    )
    return text, ids


def test_served_adapter_shows_the_trained_format(client, finetuned):
    result, prompts = finetuned
    adapter = result.record.id

    def rate(adapter_id: str) -> float:
        hits = [bool(re.fullmatch(FORMAT_REGEX, _served(client, p, adapter_id)[0].strip())) for p in prompts]
        return sum(hits) / len(hits)

    base_rate, adapter_rate = rate(""), rate(adapter)
    assert base_rate <= 0.2, base_rate
    assert adapter_rate >= 0.8, adapter_rate
    # Serving agrees with what evaluation measured before registration.
    assert abs(adapter_rate - result.eval.adapter_metric) <= 0.3


def test_served_tokens_equal_peft_greedy(client, finetuned, platform):
    import torch
    from peft import PeftModel

    from hybridserve.finetune.data import encode_chat
    from hybridserve.finetune.trainer import load_base

    result, prompts = finetuned
    tokenizer, base = load_base(platform.assets.base_dir)
    model = PeftModel.from_pretrained(base, result.record.snapshot_dir).eval()
    for prompt in prompts:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        expected = out[0, len(ids) :].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        _, served = _served(client, prompt, result.record.id)
        assert served == expected, prompt
