"""Character-level RL from random weights on tinyshakespeare (exhaustive 65-way exploration).

    python -m experiments.char --scheme=softmax --tau=0.5 --text_file=../shared/data/tinyshakespeare.txt

A GPT-2-style character model starts from random weights and learns only from rewards: for every
context, all 65 next characters are scored at once (exact match with the data, closeness under a
bigram model, a capped confidence bonus), weighted by the scheme, and the exact expected policy
gradient is taken from one forward pass (`--mode=sampled` draws G characters instead). PPO-style
clipping against a lagged policy, an entropy bonus and a KL to the bigram distribution regularise
it; the health monitors warn on the console. Eval reports cross-entropy and top-1 accuracy
on the held-out split beside the n-gram ladder, and a text sample. Without --text_file the data
comes from tensorflow-datasets (`tiny_shakespeare`), which needs a download. `--population=P`
trains seeds seed .. seed+P-1 in one compiled program (member p = the run of seed + p).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from envs import char_rewards, chartext, ngram
from models import char_gpt
from rlsoft import exhaustive_loop as xl
from rlsoft.config import check, parse_flags
from rlsoft.driver import Driver, RunConfig
from rlsoft.run_dir import RunError, prepare_run
from rlsoft.logger import format_table

PROG = "python -m experiments.char"


@dataclasses.dataclass(frozen=True)
class CharConfig(xl.ExhaustiveConfig, RunConfig):
    text_file: str = ""
    data_dir: str = ""
    model_preset: str = "cpu"
    context: int = 32
    batch_size: int = 64
    steps: int = 2000
    chunk: int = 100  # steps per compiled call (one lax.scan); the driver logs between calls
    population: int = 1  # seeds seed .. seed+P-1 trained together (vmap)
    policy: xl.optim.OptimizerConfig = xl.optim.OptimizerConfig(name="adam", learning_rate=3e-3)
    kl_coef: float = 0.0
    w_exact: float = 1.0
    w_ngram: float = 0.1
    ngram_mode: str = "shifted"
    confidence_scale: float = 1.0
    bonus_cap: float = 1.5
    smoothing: float = 0.03
    eval_every: int = 500
    checkpoint_every: int = 500
    eval_chars: int = 20000  # of the validation split (all of it: 0)
    eval_batch: int = 512
    sample_chars: int = 300

    FLAG_ALIASES: ClassVar[dict[str, str]] = xl.ExhaustiveConfig.FLAG_ALIASES

    def __post_init__(self):
        xl.ExhaustiveConfig.__post_init__(self)
        RunConfig.__post_init__(self)
        check(self.context >= 1, f"context={self.context} is invalid; need >= 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} is invalid; need >= 1")
        check(self.steps >= 1 and self.chunk >= 1, f"steps={self.steps}, chunk={self.chunk} are invalid; need >= 1")
        check(self.population >= 1, f"population={self.population} is invalid; need >= 1")
        check(self.eval_chars >= 0, f"eval_chars={self.eval_chars} is invalid; need >= 0")
        check(self.eval_batch >= 1, f"eval_batch={self.eval_batch} is invalid; need >= 1")
        check(self.sample_chars >= 0, f"sample_chars={self.sample_chars} is invalid; need >= 0")
        char_gpt.validate_preset(self.model_preset, "model_preset")
        ngram.validate_k(self.smoothing, "smoothing")
        if self.text_file:
            chartext.validate_text_file(self.text_file)
        self.reward_config()

    def reward_config(self) -> char_rewards.CharRewardConfig:
        return char_rewards.CharRewardConfig(w_exact=self.w_exact, w_ngram=self.w_ngram, ngram_order=2,
                                             ngram_mode=self.ngram_mode, confidence_scale=self.confidence_scale,
                                             bonus_cap=self.bonus_cap)


PRESETS = {
    "smoke": dict(model_preset="tiny", context=8, batch_size=16, steps=20, chunk=10, eval_every=10,
                  checkpoint_every=10, eval_chars=500, sample_chars=40, progress=False),
}


def build(cfg: CharConfig):
    """Data, n-gram reference, model (seed cfg.seed) and the testbed's device functions (nothing
    compiled yet)."""
    data = chartext.load_char_data(cfg.text_file or None, cfg.data_dir or None)
    v = data.vocab.size
    bigram = ngram.NGramModel(2, cfg.smoothing).fit(data.train, v)
    table = bigram.table()
    graphdef, params = char_gpt.init_model(model_config(cfg, v), cfg.seed)
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

    fns = xl.NextTokenFns(logits_fn, batch_fn, reward_fn, ref_log_probs_fn if cfg.kl_coef > 0 else None)
    return data, params, fns


def model_config(cfg: CharConfig, vocab_size: int) -> char_gpt.CharGPTConfig:
    return char_gpt.CharGPTConfig.preset(cfg.model_preset, vocab_size=vocab_size, block_size=max(cfg.context, 1))


def make_driver(cfg: CharConfig) -> tuple[Driver, chartext.CharData]:
    """The run directory checked first (nothing built before), then data, model, testbed, driver."""
    run_dir = prepare_run(cfg, "char")
    data, params, fns = build(cfg)
    chartext.validate_splits(data, cfg.context)
    mcfg = model_config(cfg, data.vocab.size)

    def init_params(seed: int):
        return params if seed == cfg.seed else char_gpt.init_model(mcfg, seed)[1]

    def windows(limit: int):
        ids = data.validation[: limit + cfg.context] if limit else data.validation
        return chartext.eval_windows(ids, cfg.context, batch=cfg.eval_batch)

    return Driver(xl.NextTokenTestbed(cfg, fns, init_params, windows, total_steps=cfg.steps), cfg, run_dir), data


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_flags(CharConfig, argv, presets=PRESETS, prog=PROG)
    try:
        driver, data = make_driver(cfg)
    except (chartext.DataUnavailableError, RunError, ValueError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    ladder = ngram.ladder(data.train, data.validation, data.vocab.size, orders=(1, 2, 3, 4), k=cfg.smoothing)
    print("n-gram reference on the validation split:")
    print(ngram.format_ladder(ladder))
    result = driver.run()
    if driver.stopped is not None:
        driver.close()
        print(f"stopped at step {driver.step}; resume with --resume", file=sys.stderr)
        raise SystemExit(128 + driver.stopped)
    testbed, fns = driver.testbed, driver.testbed.fns
    members = testbed.evaluate_members(driver.state, limit=0)
    final = testbed.eval_summary(members)
    sampler = xl.make_text_sampler(fns.logits_fn, cfg.context, cfg.sample_chars)
    prompt = jnp.asarray(data.validation[: cfg.context])
    # The sample: the first member's (the seed's own run).
    text = data.vocab.decode(np.asarray(sampler(testbed.member_params(driver.state), prompt, driver.keys["sample"])))
    rows = [dict(model=f"{r.order}-gram", cross_entropy=r.nats, perplexity=float(np.exp(r.nats)), top1=r.top1)
            for r in ladder]
    for p, seed in enumerate(testbed.seeds):
        who = f", seed {seed}" if testbed.population else ""
        rows.append(dict(model=f"char GPT, RL ({cfg.scheme}, {cfg.mode}{who})",
                         cross_entropy=float(members["eval/cross_entropy"][p]),
                         perplexity=float(members["eval/perplexity"][p]), top1=float(members["eval/top1"][p])))
    print(format_table(rows))
    print("sample:\n" + text)
    if driver.logger is not None:
        driver.logger.text(driver.step, "sample", text)
    driver.close()
    return dict(final=final, members=members, ladder=ladder, history=result.history, sample=text, state=driver.state,
                run_dir=driver.run_dir.path)


if __name__ == "__main__":
    main()
