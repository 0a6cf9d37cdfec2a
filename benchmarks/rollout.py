"""Rollout throughput: rlsoft.rollout's jitted sampler over models/qwen2.py against transformers `generate`.

    python -m benchmarks.rollout                         # tiny and mid presets
    python -m benchmarks.rollout --config=tiny --repeats=7

Both sides sample the same random Qwen2 (transformers builds it, `save_pretrained`, models/hf.py
loads it): 64 left-padded prompts of 113..128 tokens, 256 new tokens, no stop token, temperature 1,
no top-k / top-p. transformers runs `generate` on CPU torch (inference mode). Both sides use all
cores by default; `--threads=N` gives both N threads (XLA:CPU's pool through PJRT_NPROC, read when
the JAX client is created; torch.set_num_threads). Measured on the shared 2-core machine (tiny):
one thread was faster for both, ~400 vs ~450-530 ms a jax call and ~8,800 vs ~6,500 tokens/s
for `generate`; the decode's ~130 small ops per step gain nothing from a second thread and wait
for it when another process holds that core. The mid preset wants both (~9.3 vs ~12.3 s a call).
  jax        rlsoft.rollout sampler over models/qwen2_decode.decode_fns (segmented decode cache)
  jax_1seg   the same with one segment (chunk = new tokens): attention reads every private slot
  generic    the sampler over the plain qwen2.KVCache path (`generic_decode_fns`, the previous one)
  hf         transformers `generate`
Implementations are timed interleaved (the machine may be shared); figures are medians of
`repeats` calls. Generated tokens = batch * new tokens per call.

Efficiency of the jax decode: decode time = time(N new tokens) - time(1 new token), so the
prefill is left out. FLOPs per token = 2 * non-embedding params + 4 * layers * heads * head_dim *
context (QK and PV) + 2 * hidden * vocab (LM head); bytes per step = every weight read once + the
K/V bytes the kernel reads (the prompt prefix once per prompt, private slots up to the end of the
current chunk). Both as fractions of this machine's f32 matmul FLOP/s and memory read bandwidth,
probed between the timed calls of each round (best of 3 per round, median over rounds). Shared vs repeated: 8 prompts x G=8 samples, the prompt K/V stored and
read once per prompt or once per row.
Prints one JSON line of figures, then a table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import first_calls, interleaved
from models import hf, qwen2
from models.qwen2_decode import decode_fns, generic_decode_fns
from rlsoft import rollout
from rlsoft.config import check, parse_flags
from rlsoft.logger import format_table


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = "both"  # tiny | mid | both
    repeats: int = 5  # timed calls per implementation, tiny preset
    mid_repeats: int = 2  # the same for the mid preset (each call takes seconds)
    batch: int = 64
    prompt_len: int = 128
    new_tokens: int = 256
    group_size: int = 8  # shared vs repeated: batch / group_size prompts x group_size samples
    chunk: int = 64  # decode segment length (models/qwen2_decode.py)
    hf: bool = True  # time transformers generate
    generic: bool = True  # time the plain KVCache sampler too
    seed: int = 0
    threads: int = 0  # XLA:CPU (PJRT_NPROC) and torch threads, the same for both; 0: all cores

    def __post_init__(self):
        check(self.config in ("tiny", "mid", "both"), f"config={self.config} is invalid; expected tiny, mid or both")
        for name in ("repeats", "mid_repeats", "batch", "prompt_len", "new_tokens", "group_size", "chunk"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; need >= 1")
        check(self.threads >= 0, f"threads={self.threads} is invalid; need >= 0 (0: all cores)")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")
        check(self.new_tokens >= 2, f"new_tokens={self.new_tokens} is invalid; need >= 2")
        check(self.prompt_len >= 16, f"prompt_len={self.prompt_len} is invalid; need >= 16")
        check(self.batch % self.group_size == 0,
              f"group_size={self.group_size} is invalid; must divide batch={self.batch}")


def machine_probes():
    """Callables measuring this machine: f32 matmul FLOP/s (1024^2, and the decode's [64,128]x[128,384]
    in a loop) and memory read bytes/s. They run interleaved with the implementations, so that the
    fractions compare rates measured under the same load."""
    a = jnp.ones((1024, 1024), jnp.float32)
    dot = jax.jit(jnp.dot)
    n = 500  # a loop amortises dispatch, as in the decode; the carry keeps XLA from hoisting the dot
    x, w = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 384), jnp.float32) * 1e-3
    small_loop = jax.jit(lambda x, w: jax.lax.fori_loop(0, n, lambda i, x: (x @ w)[:, :128], x))
    buf = jnp.ones((256 * 2 ** 20 // 4,), jnp.float32)  # 256 MB, far past the caches
    total = jax.jit(jnp.sum)
    return {
        "matmul_1024_flops": (lambda: dot(a, a).block_until_ready(), 2 * 1024 ** 3),
        "matmul_64x128x384_flops": (lambda: small_loop(x, w).block_until_ready(), n * 2 * 64 * 128 * 384),
        "mem_read_bytes_per_s": (lambda: total(buf).block_until_ready(), buf.nbytes),
    }


# --------------------------------------------------------------------------------------------
# Models and prompts.


def build_models(preset: str, path: str, seed: int):
    """A random transformers Qwen2ForCausalLM saved to `path`, and the same weights in models/qwen2.py."""
    import torch
    import transformers

    p = qwen2.PRESETS[preset]
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], tie_word_embeddings=p["tie_word_embeddings"],
        max_position_embeddings=4096, use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model, hf.load_model(path)


def make_prompts(cfg: BenchConfig, n: int, vocab: int, seed: int):
    """n left-padded prompts of prompt_len - 15 .. prompt_len tokens (ids 1..vocab-1; 0 is the pad)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(cfg.prompt_len - 15, cfg.prompt_len + 1, n)
    return rollout.left_pad([rng.integers(1, vocab, k).tolist() for k in lengths], pad_id=0,
                            length=cfg.prompt_len)


def hf_generate_fn(model, tokens, mask, new_tokens: int):
    import torch

    ids, am = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=am, do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == tokens.shape[1] + new_tokens, out.shape
    return run


def jax_sample_fn(fns, state, tokens, mask, new_tokens: int, group_size: int):
    sampler = rollout.make_sampler(fns, rollout.SamplingConfig(max_new_tokens=new_tokens), group_size)
    calls = iter(range(10 ** 9))

    def run():
        out = sampler(state, tokens, mask, jax.random.key(next(calls)))
        assert bool(jax.block_until_ready(out.mask).all())  # no stop token: every row runs to the end
    return run


# --------------------------------------------------------------------------------------------
# FLOPs and bytes of the decode.


def decode_work(mcfg: qwen2.Qwen2Config, cfg: BenchConfig, prompt_lens: np.ndarray, group_size: int,
                shared: bool, n_params: int) -> tuple[float, float]:
    """(useful FLOPs, bytes read) of the N - 1 decode steps of one sampler call (models/qwen2_decode.py)."""
    layers, heads, kvh, hd = (mcfg.num_hidden_layers, mcfg.num_attention_heads, mcfg.num_key_value_heads,
                              mcfg.head_dim)
    d, vocab, n, c = mcfg.hidden_size, mcfg.vocab_size, cfg.new_tokens, cfg.chunk
    non_embedding = n_params - vocab * d * (1 if mcfg.tie_word_embeddings else 2)
    rows = np.repeat(prompt_lens, group_size)  # real prompt tokens per row
    j = np.arange(n - 1)  # step j feeds response token j; it sees the prompt and tokens 0..j
    context = rows[:, None] + j[None, :] + 1
    flops = (rows.size * (n - 1) * (2 * non_embedding + 2 * d * vocab)
             + 4 * layers * heads * hd * float(context.sum()))
    itemsize = jnp.dtype(mcfg.jnp_dtype).itemsize
    slot_bytes = 2 * layers * kvh * hd * itemsize  # K and V of one slot, all layers
    prefix_rows = len(prompt_lens) if shared else rows.size
    private = rows.size * (j // c + 1) * c  # a step reads its whole chunk and the ones before
    kv = slot_bytes * float(((n - 1) * prefix_rows * cfg.prompt_len) + private.sum())
    weights = (n - 1) * n_params * jnp.dtype(mcfg.jnp_param_dtype).itemsize
    return flops, kv + weights


# --------------------------------------------------------------------------------------------


def bench_preset(preset: str, cfg: BenchConfig, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, ours = build_models(preset, os.path.join(tmp, "hf"), cfg.seed)
    mcfg = ours.cfg
    graphdef, state = nnx.split(ours)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state))
    b, n, g = cfg.batch, cfg.new_tokens, cfg.group_size
    tokens, mask = make_prompts(cfg, b, mcfg.vocab_size, cfg.seed)
    few, few_mask = make_prompts(cfg, b // g, mcfg.vocab_size, cfg.seed + 1)

    fast = decode_fns(graphdef, chunk=cfg.chunk)
    runs = {
        "jax": jax_sample_fn(fast, state, tokens, mask, n, 1),
        "jax_prefill": jax_sample_fn(fast, state, tokens, mask, 1, 1),  # prefill + the first token
        "jax_1seg": jax_sample_fn(decode_fns(graphdef, chunk=n), state, tokens, mask, n, 1),
        "shared": jax_sample_fn(fast, state, few, few_mask, n, g),
        "repeated": jax_sample_fn(decode_fns(graphdef, shared_prompt=False, chunk=cfg.chunk), state, few,
                                  few_mask, n, g),
    }
    if cfg.generic:
        runs["generic"] = jax_sample_fn(generic_decode_fns(graphdef), state, tokens, mask, n, 1)
    if cfg.hf:
        import torch

        torch.set_num_threads(cfg.threads or os.cpu_count())
        runs["hf"] = hf_generate_fn(hf_model, tokens, mask, n)
    _, compile_s = first_calls(runs)
    probes = machine_probes()
    for run, _ in probes.values():
        run()
    rates = {name: [] for name in probes}

    def probe_round():
        for name, (run, work) in probes.items():
            best = math.inf
            for _ in range(3):  # best of 3 per round: a probe takes milliseconds
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            rates[name].append(work / best)

    times = interleaved(runs, repeats, after_round=probe_round)
    machine = {name: float(np.median(r)) for name, r in rates.items()}  # medians over the rounds
    sec = {name: float(np.median(t)) for name, t in times.items()}
    tok = {name: b * n / s for name, s in sec.items() if name != "jax_prefill"}

    decode_s = sec["jax"] - sec["jax_prefill"]
    lens = mask.sum(1)
    flops, nbytes = decode_work(mcfg, cfg, lens, 1, True, n_params)
    _, shared_bytes = decode_work(mcfg, cfg, few_mask.sum(1), g, True, n_params)
    _, repeated_bytes = decode_work(mcfg, cfg, few_mask.sum(1), g, False, n_params)
    out = {
        "model": dict(preset=preset, params=int(n_params), hidden=mcfg.hidden_size, layers=mcfg.num_hidden_layers,
                      heads=mcfg.num_attention_heads, kv_heads=mcfg.num_key_value_heads,
                      ffn=mcfg.intermediate_size, vocab=mcfg.vocab_size),
        "tokens_per_s": {k: round(v) for k, v in tok.items()},
        "machine": machine,
        "seconds_per_call": {k: round(v, 4) for k, v in sec.items()},
        "first_call_seconds": {k: round(v, 2) for k, v in compile_s.items()},
        "decode": {
            "ms_per_step": round(1e3 * decode_s / (n - 1), 3),
            "prefill_share_of_call": round(sec["jax_prefill"] / sec["jax"], 3),
            "flops_per_s": flops / decode_s,
            "bytes_per_s": nbytes / decode_s,
            "bytes_per_step": nbytes / (n - 1),
            "frac_matmul_1024": flops / decode_s / machine["matmul_1024_flops"],
            "frac_matmul_64x128x384": flops / decode_s / machine["matmul_64x128x384_flops"],
            "frac_mem_read": nbytes / decode_s / machine["mem_read_bytes_per_s"],
        },
        "shared_vs_repeated": {"prompts": b // g, "group_size": g, "ratio": round(tok["shared"] / tok["repeated"], 2),
                               "kv_plus_weight_bytes_per_step": {"shared": shared_bytes / (n - 1),
                                                                 "repeated": repeated_bytes / (n - 1)}},
    }
    if "hf" in tok:
        out["ratio_jax_over_hf"] = round(tok["jax"] / tok["hf"], 2)
    if "generic" in tok:
        out["ratio_jax_over_generic"] = round(tok["jax"] / tok["generic"], 2)
    return out


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.rollout")
    # torch's OpenMP workers spin while they wait: on a machine shared with other processes that
    # made `generate` ~30x slower with 2 threads (measured ~300 vs ~10 ms a step). Passive waiting
    # fixes it; it must be set before torch is first imported (build_models imports it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.threads:
        from jax._src import xla_bridge

        check(not xla_bridge.backends_are_initialized(),
              f"threads={cfg.threads} is invalid here; the JAX CPU client already exists")
        os.environ["PJRT_NPROC"] = str(cfg.threads)
    presets = ["tiny", "mid"] if cfg.config == "both" else [cfg.config]
    results = {p: bench_preset(p, cfg, cfg.repeats if p == "tiny" else cfg.mid_repeats) for p in presets}
    figures = {
        "workload": dict(batch=cfg.batch, prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, chunk=cfg.chunk,
                         group_size=cfg.group_size, repeats=cfg.repeats, mid_repeats=cfg.mid_repeats),
        "cpu_count": os.cpu_count(),
        "threads": cfg.threads or os.cpu_count(),
        "load_avg": os.getloadavg(),
        **results,
        "targets": {"tiny_tokens_per_s": 30000, "ratio_over_hf": 5},
    }
    print(json.dumps(figures))
    rows = []
    for p, r in results.items():
        base = r["tokens_per_s"].get("hf")
        for name in ("jax", "jax_1seg", "generic", "hf", "shared", "repeated"):
            if name not in r["tokens_per_s"]:
                continue
            row = dict(preset=p, impl=name, tokens_per_s=float(r["tokens_per_s"][name]),
                       vs_hf=r["tokens_per_s"][name] / base if base else math.nan)
            if name == "jax":
                dec = r["decode"]
                row.update(decode_ms_per_step=dec["ms_per_step"], gflop_per_s=dec["flops_per_s"] / 1e9,
                           frac_matmul_peak=dec["frac_matmul_1024"], gb_per_s=dec["bytes_per_s"] / 1e9,
                           frac_mem_bw=dec["frac_mem_read"])
            rows.append(row)
    print(format_table(rows, ["preset", "impl", "tokens_per_s", "vs_hf", "decode_ms_per_step", "gflop_per_s",
                              "frac_matmul_peak", "gb_per_s", "frac_mem_bw"]))
    return figures


if __name__ == "__main__":
    main()
