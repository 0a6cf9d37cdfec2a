"""Character-level RL from random weights on tinyshakespeare (seed 002).

    python -m experiments.char --scheme=softmax --tau=0.5 --text_file=../shared/data/tinyshakespeare.txt

A GPT-2-style character model starts from random weights and learns only from rewards: for every
context, all 65 next characters are scored at once (exact match with the data, closeness under a
bigram model, a capped confidence bonus), weighted by the scheme, and the exact expected policy
gradient is taken from one forward pass (`--mode=sampled` draws G characters instead). PPO-style
clipping against a lagged policy, an entropy bonus and a KL to the bigram distribution regularise
it; seed 002's health monitors warn on the console. Eval reports cross-entropy and top-1 accuracy
on the held-out split beside the n-gram ladder, and a text sample. Without --text_file the data
comes from tensorflow-datasets (`tiny_shakespeare`), which needs a download.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from envs import char_rewards, chartext, ngram
from rlsoft import exhaustive_loop as xl
from rlsoft import monitors
from rlsoft.config import check, parse_flags
from rlsoft.logger import TensorBoardLogger, format_table


@dataclasses.dataclass(frozen=True)
class CharConfig(xl.ExhaustiveConfig):
    text_file: str = ""
    data_dir: str = ""
    model_preset: str = "cpu"
    context: int = 32
    batch_size: int = 64
    steps: int = 2000
    chunk: int = 100  # steps per compiled call; the host logs between calls
    learning_rate: float = 3e-3
    kl_coef: float = 0.0
    w_exact: float = 1.0
    w_ngram: float = 0.1
    ngram_mode: str = "shifted"
    confidence_scale: float = 1.0
    bonus_cap: float = 1.5
    smoothing: float = 0.03
    eval_every: int = 500
    eval_chars: int = 20000  # of the validation split (all of it: 0)
    sample_chars: int = 300
    seed: int = 0
    logdir: str = ""

    def __post_init__(self):
        super().__post_init__()
        check(self.context >= 1, f"context={self.context} is invalid; need >= 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} is invalid; need >= 1")
        check(self.steps >= 1 and self.chunk >= 1, f"steps={self.steps}, chunk={self.chunk} are invalid; need >= 1")
        check(self.eval_every >= 0 and self.eval_chars >= 0, "eval_every and eval_chars must be >= 0")
        self.reward_config()

    def reward_config(self) -> char_rewards.CharRewardConfig:
        return char_rewards.CharRewardConfig(w_exact=self.w_exact, w_ngram=self.w_ngram, ngram_order=2,
                                             ngram_mode=self.ngram_mode, confidence_scale=self.confidence_scale,
                                             bonus_cap=self.bonus_cap)


PRESETS = {
    "smoke": dict(model_preset="tiny", context=8, batch_size=16, steps=20, chunk=10, eval_every=10,
                  eval_chars=500, sample_chars=40),
}


EVAL_BATCH = 512


def evaluate(evaluator, params, ids: np.ndarray, context: int, limit: int) -> dict[str, float]:
    """Cross-entropy (nats/char) and top-1 accuracy on `ids` (its first `limit` targets; 0 = all)."""
    ids = ids[: limit + context] if limit else ids
    nll = correct = count = 0.0
    for contexts, targets in chartext.eval_windows(ids, context, batch=EVAL_BATCH):
        n = len(targets)
        valid = np.arange(EVAL_BATCH) < n
        if n < EVAL_BATCH:  # pad to one compiled shape; padded rows are masked out
            contexts = np.concatenate([contexts, contexts[:1].repeat(EVAL_BATCH - n, 0)])
            targets = np.concatenate([targets, targets[:1].repeat(EVAL_BATCH - n, 0)])
        s, c = evaluator(params, contexts, targets, valid)
        nll, correct, count = nll + float(s), correct + float(c), count + n
    return {"eval/cross_entropy": nll / count, "eval/top1": correct / count}


def build(cfg: CharConfig):
    """Data, n-gram reference, model and the loop's task functions."""
    from models import char_gpt

    data = chartext.load_char_data(cfg.text_file or None, cfg.data_dir or None)
    v = data.vocab.size
    bigram = ngram.NGramModel(2, cfg.smoothing).fit(data.train, v)
    table = bigram.table()
    mcfg = char_gpt.CharGPTConfig.preset(cfg.model_preset, vocab_size=v,
                                         block_size=max(cfg.context, 1))
    graphdef, params = char_gpt.init_model(mcfg, cfg.seed)
    logits_fn = char_gpt.logits_fn(graphdef)
    train = jnp.asarray(data.train)
    rcfg = cfg.reward_config()

    def batch_fn(key):
        return chartext.sample_windows(key, train, cfg.batch_size, cfg.context)

    def reward_fn(contexts, targets, probs):
        p_target = jnp.take_along_axis(probs, targets[:, None], axis=1)[:, 0]
        return char_rewards.batch_candidate_rewards(rcfg, table, contexts, targets, p_target)

    def ref_log_probs_fn(contexts):
        return ngram.ngram_log_probs(table, contexts[:, -1:])

    task = xl.Task(logits_fn, batch_fn, reward_fn, ref_log_probs_fn if cfg.kl_coef > 0 else None)
    return data, params, task


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_flags(CharConfig, argv, presets=PRESETS, prog="python -m experiments.char")
    try:
        data, params, task = build(cfg)
    except chartext.DataUnavailableError as e:
        raise SystemExit(f"python -m experiments.char: error: {e}") from None
    ladder = ngram.ladder(data.train, data.validation, data.vocab.size, orders=(1, 2, 3, 4), k=cfg.smoothing)
    print("n-gram reference on the validation split:")
    print(ngram.format_ladder(ladder))
    mon_cfg = monitors.MonitorConfig()
    state = xl.init_state(params, cfg, mon_cfg)
    chunk = min(cfg.chunk, cfg.steps)
    run_chunk = xl.make_train_chunk(task, cfg, mon_cfg, chunk)
    evaluator = xl.make_evaluator(task.logits_fn)
    sampler = xl.make_text_sampler(task.logits_fn, cfg.context, cfg.sample_chars)
    keys = dict(zip(("train", "sample"), jax.random.split(jax.random.PRNGKey(cfg.seed))))
    logger = TensorBoardLogger(cfg.logdir) if cfg.logdir else None
    history, start = [], time.perf_counter()
    done = 0
    while done < cfg.steps:
        state, metrics = run_chunk(state, keys["train"])
        done += chunk
        row = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        health = monitors.report(state.monitor)
        row.update({f"health/{k}": v for k, v in health.items()})
        if cfg.eval_every and (done % cfg.eval_every < chunk or done >= cfg.steps):
            row.update(evaluate(evaluator, state.params, data.validation, cfg.context, cfg.eval_chars))
        row["step"] = done
        history.append(row)
        if logger is not None:
            logger.scalars(done, row)
        shown = " ".join(f"{k.split('/')[-1]}={row[k]:.3f}" for k in
                         ("loss", "accuracy", "entropy", "eval/cross_entropy", "eval/top1") if k in row)
        print(f"step {done:6d}  {shown}  ({time.perf_counter() - start:.0f} s)", flush=True)
        for w in monitors.warnings(health, mon_cfg):
            print(f"warning: {w}", flush=True)
    final = evaluate(evaluator, state.params, data.validation, cfg.context, 0)
    prompt = jnp.asarray(data.validation[: cfg.context])
    text = data.vocab.decode(np.asarray(sampler(state.params, prompt, keys["sample"])))
    rows = [dict(model=f"{r.order}-gram", cross_entropy=r.nats, top1=r.top1) for r in ladder]
    rows.append(dict(model=f"char GPT, RL ({cfg.scheme}, {cfg.mode})", cross_entropy=final["eval/cross_entropy"],
                     top1=final["eval/top1"]))
    print(format_table(rows))
    print("sample:\n" + text)
    if logger is not None:
        logger.text(cfg.steps, "sample", text)
        logger.close()
    return dict(final=final, ladder=ladder, history=history, sample=text, state=state)


if __name__ == "__main__":
    main()
