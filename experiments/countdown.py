"""Countdown with a Qwen-style transformer: softmax reward weighting vs GRPO whitening (the AWR / Boltzmann view).

    python -m experiments.countdown --tau=0.5                 # tiny model, CPU, ~10 minutes
    python -m experiments.countdown --scheme=linear           # the GRPO baseline
    python -m experiments.countdown --preset=cold             # ~0% success before RL (teacher forcing)
    python -m experiments.countdown --model=/path/to/Qwen2.5-0.5B-Instruct --preset=qwen

With no --model, a tiny Qwen2 (random init) and a SentencePiece tokenizer trained on the generated
problems (cached under --cache_dir) use the compact prompt; a supervised warm start on solver
solutions (--sft_steps) precedes RL. With --model, the checkpoint's tokenizer renders GRPO-Zero's
chat prompt. The eval success (greedy; and mean@k, the mean success of --eval_k samples at
temperature 1) is printed before and after RL with 95% intervals over the eval problems, and the
paired change over the same problems (rlsoft.eval_stats).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

from envs import countdown
# load_hf, qwen2_policy, eval_line, ... live in experiments.hf_task (shared with experiments.math); they
# stay importable from here, as tests and benchmarks import them.
from experiments.hf_task import (ModelError, change_line, eval_line, load_hf, qwen2_policy,  # noqa: F401
                                 run_and_report, stop_ids)
from rlsoft import distributed, optim, rollout
from rlsoft.config import check, parse_flags
from rlsoft.driver import Driver
from rlsoft.run_dir import RunError, prepare_run
from rlsoft.mesh import make_mesh
from rlsoft.train_loop import PRECISIONS, LanguageTestbed, TrainConfig

MARKUP = ("<think>", "</think>", "<answer>", "</answer>")


@dataclasses.dataclass(frozen=True)
class CountdownConfig(TrainConfig):
    scheme: str = "softmax"
    tau: float | str = 0.5
    # The CPU default (README, "Countdown on a CPU"): a weak warm start (~13% greedy success), then
    # 1,000 RL steps, about 10 minutes on 2 cores; eval on 1,024 held-out problems.
    policy: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=2e-4, warmup_steps=5)
    sft_learning_rate: float | None = 3e-3
    steps: int = 1000
    sft_steps: int = 150
    sl_weight: float = 0.0
    questions_per_step: int = 16
    group_size: int = 8
    sampling: rollout.SamplingConfig = rollout.SamplingConfig(max_new_tokens=24)
    eval_every: int = 100
    eval_questions: int = 1024  # generated problems: the held-out set has this many
    eval_batch: int = 128
    checkpoint_every: int = 100
    model: str = ""  # a local Hugging Face Qwen2 directory; empty: the tiny model below
    model_preset: str = "tiny"
    vocab_size: int = 64
    num_train: int = 20000
    data: str = ""  # a Countdown-Tasks-3to4 parquet (file or folder); empty: generated problems
    data_seed: int = 0
    # Generated problems: how many numbers, and their range (the CPU default is an easier Countdown).
    sizes: tuple[int, ...] = (3,)
    max_number: int = 30
    max_target: int = 100
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "rlsoft")

    def __post_init__(self):
        super().__post_init__()
        check(self.num_train >= self.questions_per_step,
              f"num_train={self.num_train} is invalid; need >= questions_per_step")
        check(not self.model or os.path.isdir(self.model), f"model={self.model} is not a directory")
        for name in ("config.json", "tokenizer.json") if self.model else ():
            check(os.path.isfile(os.path.join(self.model, name)),
                  f"model={self.model} is invalid; it has no {name} (expected a Hugging Face checkpoint directory)")
        check(not self.data or os.path.exists(self.data), f"data={self.data} does not exist")
        check(self.vocab_size >= 16, f"vocab_size={self.vocab_size} is invalid; need >= 16")
        check(len(self.sizes) > 0 and all(n in (2, 3, 4, 5) for n in self.sizes),
              f"sizes={self.sizes} is invalid; allowed: numbers of 2..5")
        check(self.max_number >= 2, f"max_number={self.max_number} is invalid; need >= 2")
        check(self.max_target >= 1, f"max_target={self.max_target} is invalid; need >= 1")
        check(self.eval_questions >= 1, f"eval_questions={self.eval_questions} is invalid; need >= 1")


PRESETS = {
    "smoke": dict(steps=2, sft_steps=2, questions_per_step=4, group_size=4, eval_every=0, eval_questions=8,
                  eval_batch=8, num_train=200, max_new_tokens=16, checkpoint_every=2, progress=False),
    # The teacher-forcing setting: a warm start that teaches the format but leaves ~0% success.
    "cold": dict(sft_steps=50),
    # sft_learning_rate: the tiny model's 3e-3 would wreck a pretrained checkpoint if --sft_steps is set.
    "qwen": dict(sizes=(3, 4), max_number=99, learning_rate=1e-6, sft_learning_rate=1e-5, warmup_steps=0, sft_steps=0,
                 max_new_tokens=1024, eval_batch=16, questions_per_step=32, group_size=8, micro_batches=8),
}
PROG = "python -m experiments.countdown"


class CountdownTask:
    """envs.countdown behind the loop's Task protocol, with any tokenizer."""

    def __init__(self, train, test, tokenizer, chat: bool, stop_ids: tuple[int, ...]):
        self.splits = {"train": train, "eval": test}
        self.tok, self.chat = tokenizer, chat
        self.num_train, self.num_eval = len(train), len(test)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else stop_ids[0]
        self.stop_ids = stop_ids
        self.end = stop_ids[0]
        self.max_prompt_length = max(len(self._prompt(p)) for s in self.splits.values() for p in s)

    def _prompt(self, p) -> list[int]:
        if self.chat:
            messages, prefix = countdown.chat_prompt(p)
            return self.tok.encode(self.tok.apply_chat_template(messages) + prefix)
        return self.tok.encode(countdown.tiny_prompt(p))

    def prompt_tokens(self, indices, split):
        return [self._prompt(self.splits[split][i]) for i in indices]

    def reference_tokens(self, indices, split):
        return [self.tok.encode(countdown.sft_completion(self.splits[split][i])) + [self.end] for i in indices]

    def score(self, indices, split, responses):
        problems = [self.splits[split][i] for i in indices]
        texts = [self.decode(r) for r in responses]
        r = countdown.batch_rewards(texts, [p.nums for p in problems], [p.target for p in problems])
        return {"reward": r.reward, "format": r.format, "success": r.answer}

    def decode(self, tokens):
        return self.tok.decode([t for t in tokens if t not in self.stop_ids and t != self.pad_id])


def build(cfg: CountdownConfig):
    """Problems, tokenizer, model and task for `cfg` (the Flax model is created here)."""
    from flax import nnx

    from models import qwen2

    if cfg.data:
        train, test = countdown.load_parquet(cfg.data, with_solutions=cfg.sft_steps > 0 or cfg.inject_gt
                                             or cfg.sl_weight > 0)
        train = train[: cfg.num_train]
    else:
        train, test = countdown.make_splits(cfg.num_train, seed=cfg.data_seed, num_test=cfg.eval_questions,
                                            sizes=cfg.sizes,
                                            max_number=cfg.max_number, max_target=cfg.max_target)
    # --precision=bf16: bf16 compute on float32 parameters (master weights; the optimizer state follows them).
    dtypes = dict(dtype=PRECISIONS[cfg.precision], param_dtype="float32")
    if cfg.model:
        # Each parameter read straight into its sharding on the run's mesh (models.hf, mesh=).
        tok, model, stops = load_hf(cfg.model, mesh=make_mesh(cfg.mesh), **dtypes)
        task = CountdownTask(train, test, tok, chat=True, stop_ids=stops)
    else:
        from models.spm import SentencePieceTokenizer

        corpus = [countdown.tiny_prompt(p) + countdown.sft_completion(p) for p in train]
        tok = SentencePieceTokenizer.train(corpus, cfg.vocab_size, symbols=MARKUP, cache_dir=cfg.cache_dir)
        mcfg = qwen2.Qwen2Config.preset(cfg.model_preset, vocab_size=tok.vocab_size, **dtypes)
        model = qwen2.Qwen2(mcfg, rngs=nnx.Rngs(cfg.seed))
        task = CountdownTask(train, test, tok, chat=False, stop_ids=(tok.eos_id,))
    graphdef, params = nnx.split(model)
    return qwen2_policy(graphdef, model.cfg, remat=cfg.remat), params, task


def make_driver(cfg: CountdownConfig) -> Driver:
    """The multi-process runtime joined first (--distributed; before any JAX call), the mesh sizes
    against the (global) devices and the run directory checked (nothing built before), then the
    model, task and driver."""
    distributed.initialize(cfg.distributed)
    make_mesh(cfg.mesh)
    run_dir = prepare_run(cfg, "countdown")
    policy, params, task = build(cfg)
    return Driver(LanguageTestbed(cfg, policy, params, task), cfg, run_dir)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_flags(CountdownConfig, argv, presets=PRESETS, prog=PROG)
    try:
        # A bad checkpoint is a bad --model value, a bad parquet a bad --data value: one line, exit 2.
        driver = make_driver(cfg)
    except (ModelError, RunError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return run_and_report(driver)


if __name__ == "__main__":
    main()
