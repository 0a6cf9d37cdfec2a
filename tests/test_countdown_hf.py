"""`python -m experiments.countdown --model=<HF dir>`: a real Hugging Face checkpoint directory end to end.

The checkpoint is tiny and random (transformers' Qwen2ForCausalLM, save_pretrained) with a real
tokenizer.json trained here with the `tokenizers` package and a tokenizer_config.json holding Qwen2.5's
ChatML chat template: nothing is downloaded.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

import jax  # noqa: E402

from envs import countdown as env  # noqa: E402
from experiments import countdown  # noqa: E402
from models import hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5-Instruct's chat template without its tool-calling branches (the same output without tools).
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Small enough for well under a minute on 2 CPU cores; --preset=qwen would ask for 1024 new tokens.
RUN_FLAGS = ["--preset=qwen", "--sft_steps=2", "--steps=2", "--questions_per_step=2", "--group_size=2",
             "--micro_batches=1", "--max_new_tokens=8", "--eval_questions=4", "--eval_batch=4", "--eval_every=0",
             "--num_train=40", "--checkpoint_every=0", "--progress=false", "--sft_learning_rate=1e-2"]


def write_tokenizer(path, specials=SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", vocab_size=1000):
    """A byte-level BPE tokenizer.json (Qwen's kind) trained on Countdown chat prompts and answers."""
    train, _ = env.make_splits(200, seed=1, sizes=(3, 4), max_number=99, max_target=100)
    corpus = []
    for p in train[:60]:
        messages, prefix = env.chat_prompt(p)
        corpus.append(hf.render_chatml(messages) + prefix + env.sft_completion(p))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"chat_template": QWEN25_TEMPLATE, "eos_token": eos, "pad_token": pad,
              "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok.get_vocab_size()


def copy_model_files(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Qwen2ForCausalLM + tokenizer directory, as an HF hub snapshot would look."""
    path = str(tmp_path_factory.mktemp("hf") / "tiny-qwen2")
    n_tokens = write_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=(n_tokens // 64 + 1) * 64,  # padded past the tokenizer, like Qwen's 151936 > 151665
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=1024, use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF inits biases to 0: randomise so the export check sees them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def test_main_trains_an_hf_checkpoint_with_the_chat_prompt(ckpt, tmp_path, capsys):
    result = countdown.main([f"--model={ckpt}", *RUN_FLAGS])
    out = capsys.readouterr().out
    assert "eval success before RL" in out and "eval success after RL" in out
    # Success rates over --eval_questions=4 (multiples of 1/4), and the values printed.
    assert all(result[w] * 4 == round(result[w] * 4) for w in ("before", "after")), result
    assert f"eval success before RL: {result['before']:.3f} [" in out
    assert f"eval success after RL:  {result['after']:.3f} [" in out
    history = result["history"]
    assert len(history) == 4  # 2 warm-start + 2 RL steps
    rl = [h for h in history if "train/reward" in h]
    assert len(rl) == 2 and all(np.isfinite(h["train/loss"] if "train/reward" in h else h["sft/loss"])
                                for h in history)

    driver = result["driver"]
    task, tok = driver.testbed.task, driver.testbed.task.tok
    assert isinstance(tok, hf.Tokenizer) and task.chat
    # GRPO-Zero's prompt, rendered by the checkpoint's own template, survives tokenization exactly.
    problem = task.splits["train"][0]
    ids = task.prompt_tokens([0], "train")[0]
    text = tok.decode(ids, skip_special_tokens=False)
    messages, prefix = env.chat_prompt(problem)
    assert text == hf.render_chatml(messages) + prefix
    assert text.startswith("<|im_start|>system\n" + env.SYSTEM_MESSAGE + "<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>")
    assert ids[0] == tok.token_id("<|im_start|>")
    # <|im_end|> ends the answer (and the warm-start targets); padding is <|endoftext|>.
    im_end = tok.token_id("<|im_end|>")
    assert task.stop_ids == (im_end,) and tok.eos_id == im_end
    assert task.pad_id == tok.token_id("<|endoftext|>")
    ref = task.reference_tokens([0], "train")[0]
    assert ref[-1] == im_end and "<think>" + task.decode(ref) == "<think>" + env.sft_completion(problem)
    assert task.score([0], "train", [ref])["success"][0] == 1.0

    # Export the trained params back to the HF layout; transformers loads them and computes the same logits.
    from flax import nnx

    graphdef, before = nnx.split(hf.load_model(ckpt))
    params = driver.state.params("policy")
    trained = nnx.merge(graphdef, params)
    changed = [not np.allclose(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params))]
    assert any(changed), "training left every parameter unchanged"
    out_dir = str(tmp_path / "export")
    hf.save_model(trained, out_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokens = np.asarray([ids], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    mask = np.ones_like(tokens, bool)
    ours = np.asarray(trained(tokens, positions, mask))
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    assert hf.load_model(out_dir).cfg == hf.load_model(ckpt).cfg


@pytest.mark.parametrize("kind", ["nonexistent", "no_config"])
def test_bad_model_path_exits_2_with_one_line(tmp_path, kind):
    path = "/nonexistent" if kind == "nonexistent" else str(tmp_path)
    env_vars = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.countdown", f"--model={path}"], cwd=ROOT,
                          env=env_vars, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m experiments.countdown: error: model="), err
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def _broken(ckpt, tmp_path, kind):
    """A copy of `ckpt` with one defect."""
    path = str(tmp_path / kind)
    copy_model_files(ckpt, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ckpt, name), os.path.join(path, name))
    if kind == "no_tokenizer":
        os.remove(os.path.join(path, "tokenizer.json"))
    elif kind == "corrupt_tokenizer":
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write("{not json")
    elif kind == "corrupt_config":
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write("{")
    elif kind == "llama_config":
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, "model_type": "llama"}, f)
    elif kind == "no_weights":
        os.remove(os.path.join(path, "model.safetensors"))
    elif kind == "no_stop_token":
        write_tokenizer(path, specials=["<|endoftext|>", "<|im_start|>"], eos=None, pad="<|endoftext|>")
    elif kind == "eos_not_in_vocab":
        write_tokenizer(path, eos="</s>")
    elif kind == "small_model_vocab":
        from flax import nnx

        from models.qwen2 import Qwen2, Qwen2Config

        small = Qwen2(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2), rngs=nnx.Rngs(0))
        hf.save_model(small, path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("no_tokenizer", "has no tokenizer.json"),
    ("corrupt_tokenizer", "is not a valid tokenizer.json"),
    ("corrupt_config", "is not valid JSON"),
    ("llama_config", "model_type=llama"),
    ("no_weights", "no *.safetensors"),
    ("no_stop_token", "neither <|im_end|> nor an eos_token"),
    ("eos_not_in_vocab", "'</s>' is not in the vocabulary"),
    ("small_model_vocab", "only 64 embeddings"),
])
def test_broken_checkpoint_exits_2_with_one_line(ckpt, tmp_path, capsys, kind, message):
    path = _broken(ckpt, tmp_path, kind)
    with pytest.raises(SystemExit) as e:
        countdown.main([f"--model={path}", *RUN_FLAGS])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m experiments.countdown: error: model={path}"), err
    assert message in err[0], err


def test_stop_ids_without_im_end(ckpt, tmp_path):
    """A tokenizer without <|im_end|> (e.g. a base model's) stops on its eos token alone."""
    path = str(tmp_path / "base")
    copy_model_files(ckpt, path)
    write_tokenizer(path, specials=["<|endoftext|>", "<|im_start|>"], eos="<|endoftext|>", pad=None)
    tok, _, stops = countdown.load_hf(path)
    assert tok.find_id("<|im_end|>") is None
    assert stops == (tok.token_id("<|endoftext|>"),) and tok.pad_id is None
    # The Qwen order when both exist: <|im_end|> first (it ends the assistant turn), then eos.
    write_tokenizer(path, eos="<|endoftext|>")
    tok, _, stops = countdown.load_hf(path)
    assert stops == (tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"))
