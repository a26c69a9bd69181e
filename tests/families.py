"""Tiny checkpoints whose tokenizers follow the conventions real families disagree on.

Each family is a byte-level BPE tokenizer trained offline on a few sentences, with the
special tokens, pad/EOS/BOS choices and chat template of a real family, and a tiny
random Llama saved beside it with the family's config (pad id as the checkpoint has
it, generation_config EOS ids), so the loaders see what a user's hub checkpoint shows:

- chatml_pad_is_eos: SmolLM2 (ChatML, default system prompt, pad == EOS == <|im_end|>)
- llama3: Llama-3-Instruct (BOS in the template and added by the tokenizer, no pad, EOS
  <|end_of_text|>, turns end with <|eot_id|>, generation_config EOS list, a reserved pad token)
- mistral: no pad, <unk> present, [INST] template, BOS added by the tokenizer
- qwen: ChatML, no BOS, a pad (<|endoftext|>) that generation_config also lists as an
  EOS (as Qwen2.5-Instruct ships): it cannot pad, so a pad token is added
- distinct_pad: ChatML with a pad of its own, kept as it is
- bare: no chat template, no pad, nothing to reuse: a pad token is added
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")

FAMILIES = {
    "chatml_pad_is_eos": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|im_start|>",
                              eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>", template=CHATML,
                              add_bos=False, gen_eos=None, end="<|im_end|>", pad_expected="<|endoftext|>"),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>", "<|finetune_right_pad_id|>"], bos="<|begin_of_text|>",
                   eos="<|end_of_text|>", pad=None, unk=None, template=LLAMA3, add_bos=True,
                   gen_eos=["<|end_of_text|>", "<|eot_id|>"], end="<|eot_id|>",
                   pad_expected="<|finetune_right_pad_id|>"),
    "mistral": dict(specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None, unk="<unk>",
                    template=MISTRAL, add_bos=True, gen_eos=None, end="</s>", pad_expected="<unk>"),
    "qwen": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                 pad="<|endoftext|>", unk=None, template=CHATML, add_bos=False, gen_eos=["<|im_end|>", "<|endoftext|>"],
                 end="<|im_end|>", pad_expected="<|pad|>"),
    "distinct_pad": dict(specials=["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"], bos=None,
                         eos="<|im_end|>", pad="<|padding|>", unk=None, template=CHATML, add_bos=False, gen_eos=None,
                         end="<|im_end|>", pad_expected="<|padding|>"),
    "bare": dict(specials=["<eos>"], bos=None, eos="<eos>", pad=None, unk=None, template=None, add_bos=False,
                 gen_eos=None, end="<eos>", pad_expected="<|pad|>"),
}

CORPUS = ["Describe the apple in one word.", "The apple is lovely.", "The river is calm.", "ok", "Say ok.",
          "Hello there, how are you today?", "system user assistant", "You are a helpful assistant."]


def build_family(name: str, out: Path, arch: dict) -> Path:
    """Write the family's tokenizer and a tiny random Llama (`arch`, vocab from the
    tokenizer) into `out`; return `out`. Idempotent."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    f = FAMILIES[name]
    if (out / "config.json").is_file():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=f["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if f["add_bos"]:
        bos_id = tok.token_to_id(f["bos"])
        tok.post_processor = processors.TemplateProcessing(single=f"{f['bos']} $A", pair=f"{f['bos']} $A $B",
                                                           special_tokens=[(f["bos"], bos_id)])
    kwargs = {k: f[k] for k in ("bos", "eos", "pad", "unk") if f[k] is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in kwargs.items()})
    if f["template"] is not None:
        fast.chat_template = f["template"]
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    vocab = fast.get_vocab()
    config = LlamaConfig(**{k: v for k, v in arch.items() if k != "model_type"}, vocab_size=len(fast),
                         eos_token_id=vocab[f["eos"]], bos_token_id=vocab[f["bos"]] if f["bos"] else None,
                         pad_token_id=vocab[f["pad"]] if f["pad"] else None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    gen_eos = [vocab[t] for t in f["gen_eos"]] if f["gen_eos"] else vocab[f["eos"]]
    model.generation_config = GenerationConfig(eos_token_id=gen_eos, bos_token_id=config.bos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    (out / "family.json").write_text(json.dumps({"name": name}))
    return out


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Short chats whose replies a tiny model learns in a few steps: 'The X is ok.'"""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(["apple", "river", "stone"])
        rows.append({"messages": [{"role": "user", "content": f"Describe the {noun} in one word."},
                                  {"role": "assistant", "content": f"The {noun} is ok."}]})
    return rows
