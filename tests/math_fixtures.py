"""Small GSM8K / MATH files in the public layouts, and a tiny random Hugging Face Qwen2 directory whose
tokenizer is trained on their chat prompts (tests/test_gsm8k.py, tests/test_math_tasks.py). Nothing is
downloaded: the checkpoint is transformers' Qwen2ForCausalLM with random weights (save_pretrained)."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

GSM8K_ROWS = [
    {"question": "Janet has 16 eggs and eats 3. How many are left?",
     "answer": "She has 16 - 3 = <<16-3=13>>13 eggs left.\n#### 13"},
    {"question": "A shop sells 250 pens a day for 4 days. How many pens?",
     "answer": "It sells 250 * 4 = <<250*4=1000>>1000 pens.\n#### 1,000"},
    {"question": "Tom had $5.50 and spent $2. How much is left?",
     "answer": "He has 5.50 - 2 = <<5.5-2=3.5>>3.5 dollars.\n#### 3.5"},
    {"question": "The temperature was 2 degrees and fell 7. What is it now?",
     "answer": "It is 2 - 7 = <<2-7=-5>>-5 degrees.\n#### -5"},
]

MATH_ROWS = [
    {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Solve $x^2 = 9$ for $x > 0$.", "solution": "So $x = \\boxed{3}$.", "level": "Level 2",
     "type": "Algebra"},
    {"problem": "Compute $\\sin(\\pi/3)$.", "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
     "level": "Level 4", "type": "Precalculus"},
    {"problem": "How many subsets has a 3-set?", "solution": "$2^3 = \\boxed{8}$.", "level": "Level 5",
     "type": "Counting & Probability"},
    {"problem": "Find the interval where $x^2 < 1$.", "solution": "$\\boxed{(-1, 1)}$", "level": "Level ?",
     "type": "Algebra"},
]


def write_rows(path, rows):
    """rows as a .jsonl or .parquet file (by the suffix), the public layouts."""
    path = str(path)
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_checkpoint(path, texts):
    """A tiny random Qwen2ForCausalLM + byte-level BPE tokenizer (trained on `texts`) + ChatML template."""
    import tokenizers
    import torch
    import transformers

    from test_countdown_hf import QWEN25_TEMPLATE, SPECIALS

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": QWEN25_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "tokenizer_class": "Qwen2Tokenizer"}, f)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=(tok.get_vocab_size() // 64 + 1) * 64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=10000.0, max_position_embeddings=1024, use_sliding_window=False)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def prompt_corpus(problems):
    """Chat prompts and warm-start targets of envs.math_prompts, the tokenizer's training text."""
    from envs import math_prompts
    from models import hf

    out = []
    for p in problems:
        messages, prefix = math_prompts.chat_prompt(p.question)
        out.append(hf.render_chatml(messages) + prefix + math_prompts.sft_completion(p.reasoning, p.gold))
    return out
