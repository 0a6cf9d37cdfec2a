"""Parity of models/qwen2.py + models/hf.py against transformers' Qwen2ForCausalLM (CPU, fp32).

Every HF model here is tiny, random and saved to tmp_path: nothing is downloaded.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from flax import nnx  # noqa: E402

from models import hf  # noqa: E402
from models.qwen2 import (KVCache, Qwen2Config, cache_bytes, decode_step, init_cache, prefill,  # noqa: E402
                          prefill_shared)
from models.qwen2_train import response_logits, train_forward  # noqa: E402

VOCAB, T, NEW = 256, 12, 32
PAD_LENGTHS = (0, 3, 7)  # left padding per row
TOL = 1e-5


def make_hf(path, kv_heads=2, tied=True, seed=0):
    """A random HF Qwen2 with non-trivial biases and norm weights, saved (safetensors) to `path`."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=10000.0,
        max_position_embeddings=512, use_sliding_window=False, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: randomise so the test sees them
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def padded_batch(seed=0, t=T, pads=PAD_LENGTHS):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (len(pads), t)).astype(np.int32)
    mask = np.arange(t)[None, :] >= np.asarray(pads)[:, None]
    tokens[~mask] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)  # HF generate's rule
    return tokens, positions, mask


def hf_logits(model, tokens, positions, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.numpy()


@jax.jit
def forward(model, tokens, positions, mask):
    return model(tokens, positions, mask)


def max_diff_on_mask(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask)].max())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(hf model, checkpoint dir, our model) shared by the non-parametrised tests."""
    path = str(tmp_path_factory.mktemp("qwen2") / "hf")
    model = make_hf(path, kv_heads=2, tied=True)
    return model, path, hf.load_model(path)


@pytest.mark.parametrize("kv_heads,tied", [(4, True), (2, False), (1, True), (1, False)])
def test_forward_parity_with_left_padding(tmp_path, kv_heads, tied):
    model = make_hf(str(tmp_path), kv_heads=kv_heads, tied=tied, seed=kv_heads)
    ours = hf.load_model(str(tmp_path))
    assert ours.cfg.num_key_value_heads == kv_heads and ours.cfg.tie_word_embeddings == tied
    tokens, positions, mask = padded_batch(seed=kv_heads)
    diff = max_diff_on_mask(forward(ours, tokens, positions, mask), hf_logits(model, tokens, positions, mask), mask)
    print(f"forward parity kv_heads={kv_heads} tied={tied}: max abs diff {diff:.2e}")
    assert diff < TOL


def greedy(model, cache, tokens, positions, mask, steps):
    """Prefill then `steps` greedy tokens, the decode loop a lax.scan carrying the cache pytree."""
    logits, cache = prefill(model, cache, tokens, positions, mask)
    first, pos = jnp.argmax(logits[:, -1], -1).astype(jnp.int32), positions[:, -1] + 1

    def body(carry, _):
        cache, tok, pos = carry
        logits, cache = decode_step(model, cache, tok, pos)
        return (cache, jnp.argmax(logits, -1).astype(jnp.int32), pos + 1), tok

    _, out = jax.lax.scan(body, (cache, first, pos), None, length=steps)
    return out.T


def test_greedy_generation_matches_transformers(ckpt):
    model, _, ours = ckpt
    tokens, positions, mask = padded_batch(seed=1)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    cache = init_cache(ours.cfg, len(tokens), T + NEW)
    got = jax.jit(greedy, static_argnums=5)(ours, cache, tokens, positions, mask, NEW)
    np.testing.assert_array_equal(np.asarray(got), ref[:, T:].numpy())


def test_cached_decode_equals_training_forward(ckpt):
    _, _, ours = ckpt
    tokens, positions, mask = padded_batch(seed=2, t=T + 6)
    full = forward(ours, tokens, positions, mask)
    cache = init_cache(ours.cfg, len(tokens), T + 8)
    logits, cache = jax.jit(prefill)(ours, cache, tokens[:, :T], positions[:, :T], mask[:, :T])
    diffs = [max_diff_on_mask(logits, full[:, :T], mask[:, :T])]
    step = jax.jit(decode_step)
    for t in range(T, T + 6):
        logits, cache = step(ours, cache, tokens[:, t], positions[:, t])
        diffs.append(float(jnp.abs(logits - full[:, t]).max()))
    print(f"cached decode vs forward: max abs diff {max(diffs):.2e}")
    assert max(diffs) < TOL
    np.testing.assert_array_equal(np.asarray(cache.index), T + 6)


@pytest.mark.parametrize("block", [1, 5, 64])
def test_blocked_training_forward_matches_transformers(ckpt, block):
    """models/qwen2_train.train_forward (blocked causal attention) against HF on every real position."""
    model, _, ours = ckpt
    tokens, positions, mask = padded_batch(seed=3)
    graphdef, state = nnx.split(ours)
    logits = jax.jit(train_forward(graphdef, block))(state, tokens, positions, mask)
    diff = max_diff_on_mask(logits, hf_logits(model, tokens, positions, mask), mask)
    print(f"blocked training forward (block {block}) vs transformers: max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("block", [3, 64])
def test_group_shared_response_logits_match_transformers(ckpt, block):
    """response_logits (prompt once per group) == HF's logits of each prompt + response sequence."""
    model, _, ours = ckpt
    g, n = 2, 7
    prompts, _, pmask = padded_batch(seed=4)
    rng = np.random.default_rng(5)
    resp = rng.integers(1, VOCAB, (len(prompts) * g, n)).astype(np.int32)
    rmask = np.ones(resp.shape, bool)
    rmask[1, 4:] = rmask[4, 1:] = False  # rows that stopped early
    resp[~rmask] = 0
    seq = np.concatenate([np.repeat(prompts, g, 0), resp], 1)
    smask = np.concatenate([np.repeat(pmask, g, 0), rmask], 1)
    spos = np.maximum(np.cumsum(smask, axis=1) - 1, 0)
    want = hf_logits(model, seq, spos, smask)[:, T - 1:-1]
    graphdef, state = nnx.split(ours)
    got = jax.jit(response_logits(graphdef, block))(state, prompts, pmask, resp, rmask)
    assert got.shape == (len(resp), n, VOCAB)
    diff = max_diff_on_mask(got, want, rmask)
    print(f"group-shared response logits (block {block}) vs transformers: max abs diff {diff:.2e}")
    assert diff < TOL
    # A one-token response: only the prompt's last state goes through the head.
    one = jax.jit(response_logits(graphdef, block))(state, prompts, pmask, resp[:, :1], rmask[:, :1])
    assert one.shape == (len(resp), 1, VOCAB) and max_diff_on_mask(one, want[:, :1], rmask[:, :1]) < TOL


def test_group_shared_prompt_cache(ckpt):
    """Decoding G different continuations against one shared prompt == the full forward of each."""
    _, _, ours = ckpt
    g, new = 3, 5
    prompts, p_pos, p_mask = padded_batch(seed=3)
    rng = np.random.default_rng(4)
    cont = rng.integers(1, VOCAB, (len(prompts) * g, new)).astype(np.int32)
    full_tok = np.concatenate([np.repeat(prompts, g, 0), cont], 1)
    full_mask = np.concatenate([np.repeat(p_mask, g, 0), np.ones_like(cont, bool)], 1)
    full_pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0).astype(np.int32)
    full = forward(ours, full_tok, full_pos, full_mask)

    logits, cache = prefill_shared(ours, prompts, p_pos, p_mask, group_size=g, max_new=new)
    assert cache.prefix_k.shape[1] == len(prompts) and cache.k.shape[1] == len(prompts) * g
    diffs = [max_diff_on_mask(np.repeat(logits, g, 0), full[:, :T], full_mask[:, :T])]
    step = jax.jit(decode_step)
    for j in range(new):
        out, cache = step(ours, cache, cont[:, j], full_pos[:, T + j])
        diffs.append(float(jnp.abs(out - full[:, T + j]).max()))
    print(f"shared-prompt decode vs forward: max abs diff {max(diffs):.2e}")
    assert max(diffs) < TOL

    # Memory: Bp=8 prompts x G=8 samples, prompt 128, 256 new tokens, tiny preset (shapes only).
    cfg = Qwen2Config.preset("tiny")
    bp, g, p, n = 8, 8, 128, 256
    plain = cache_bytes(jax.eval_shape(lambda: init_cache(cfg, bp * g, p + n)))
    shared = cache_bytes(jax.eval_shape(lambda: init_cache(cfg, bp * g, n)._replace(
        prefix_k=jnp.zeros((cfg.num_hidden_layers, bp, p, cfg.num_key_value_heads, cfg.head_dim)),
        prefix_v=jnp.zeros((cfg.num_hidden_layers, bp, p, cfg.num_key_value_heads, cfg.head_dim)),
        prefix_valid=jnp.zeros((bp, p), bool))))
    print(f"tiny cache bytes Bp={bp} G={g} P={p} N={n}: plain {plain}, shared {shared}")
    # Per row the K/V slots go from P + N to N + P / G: 384 -> 272 here.
    assert isinstance(cache, KVCache) and shared == pytest.approx(plain * (n + p / g) / (p + n), rel=1e-3)


def test_export_round_trip(ckpt, tmp_path):
    model, _, ours = ckpt
    hf.save_model(ours, str(tmp_path))
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    tokens, positions, mask = padded_batch(seed=5)
    diff = max_diff_on_mask(hf_logits(back, tokens, positions, mask), hf_logits(model, tokens, positions, mask), mask)
    assert diff == 0.0  # fp32 weights survive the round trip bit for bit


def test_bfloat16_load_and_export(ckpt, tmp_path):
    model, path, _ = ckpt
    ours = hf.load_model(path, dtype="bfloat16")
    assert ours.embed_tokens.embedding[...].dtype == jnp.bfloat16
    tokens, positions, mask = padded_batch(seed=6)
    ref = hf_logits(model, tokens, positions, mask)
    assert max_diff_on_mask(forward(ours, tokens, positions, mask), ref, mask) < 0.1 * np.abs(ref).max()
    hf.save_model(ours, str(tmp_path))
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path))
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16


def test_sharded_checkpoint_loads(ckpt, tmp_path):
    model, _, _ = ckpt
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = hf.load_model(str(tmp_path))
    tokens, positions, mask = padded_batch(seed=7)
    assert max_diff_on_mask(forward(ours, tokens, positions, mask), hf_logits(model, tokens, positions, mask),
                            mask) < TOL


@pytest.mark.parametrize("problem,name", [
    ("missing", "model.layers.1.mlp.up_proj.weight"),
    ("unexpected", "model.layers.0.self_attn.extra_proj.weight"),
    ("shape", "model.layers.0.self_attn.k_proj.bias"),
])
def test_loader_errors_name_the_tensor(ckpt, tmp_path, problem, name):
    _, path, _ = ckpt
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if problem == "missing":
        del tensors[name]
    elif problem == "unexpected":
        tensors[name] = np.zeros((4, 4), np.float32)
    else:
        tensors[name] = np.zeros(tensors[name].shape[0] + 1, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        hf.load_model(str(tmp_path))
    assert {"missing": "missing", "unexpected": "unexpected", "shape": "shape"}[problem] in str(err.value)


def test_config_presets_and_validation():
    cfg = Qwen2Config.preset("qwen2.5-0.5b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == (896, 24, 64, 151936)
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        Qwen2Config.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="preset=huge"):
        Qwen2Config.preset("huge")
    with pytest.raises(ValueError, match="use_sliding_window"):
        hf.config_from_hf({**hf.config_to_hf(cfg), "use_sliding_window": True})


QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_tokenizer_and_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["what is two plus two", "the answer is four", "you are a helpful assistant"] * 5,
                            vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"chat_template": QWEN_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    tok = hf.Tokenizer.from_dir(str(tmp_path))
    messages = [{"role": "user", "content": "what is two plus two?"}]
    text = tok.apply_chat_template(messages)
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    assert text == hf.render_chatml(system + messages)
    assert tok.apply_chat_template(system + messages) == text
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<|im_start|>") and tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_id == tok.token_id("<|im_end|>") and tok.pad_id == tok.token_id("<|endoftext|>")

    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert ref.encode(text, add_special_tokens=False) == ids
    assert hf.Tokenizer(tok.tokenizer).apply_chat_template(messages) == hf.render_chatml(messages)
