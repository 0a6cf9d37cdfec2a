"""GSM8K and MATH with a Hugging Face Qwen2: softmax reward weighting vs GRPO whitening, answers checked
by math-verify (envs.math_verify_reward).

    python -m experiments.math --task=gsm8k --data=gsm8k/train.jsonl --eval_data=gsm8k/test.jsonl \\
        --model=/path/to/Qwen2.5-0.5B-Instruct
    python -m experiments.math --task=math --data=math/train.parquet --eval_data=math500/test.jsonl \\
        --levels=4,5 --types=Algebra,Precalculus --model=/path/to/Qwen2.5-Math-1.5B --scheme=linear
    python -m experiments.math --task=gsm8k --data=test.jsonl --model=<dir> --preset=smoke   # a few steps

The split is the file: --data trains, --eval_data evaluates; without --eval_data the last
--eval_questions rows of --data are held out for eval (and not trained on). Nothing is downloaded.
The defaults are Countdown's `qwen` preset (experiments.countdown). Eval prints the greedy success
(pass@1) and mean@k (--eval_k samples at temperature 1) before and after RL, with 95% intervals and
the paired change (experiments.hf_task). A bad --data, --model or filter: one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

from envs import gsm8k, hendrycks_math, math_prompts
from envs.math_data import MathDataError
from envs.math_verify_reward import AnswerChecker
from experiments.hf_task import ModelError, load_hf, qwen2_policy, run_and_report
from rlsoft import distributed, optim, rollout
from rlsoft.config import check, parse_flags
from rlsoft.driver import Driver
from rlsoft.run_dir import RunError, prepare_run
from rlsoft.mesh import make_mesh
from rlsoft.train_loop import PRECISIONS, LanguageTestbed, TrainConfig

TASKS = {"gsm8k": gsm8k, "math": hendrycks_math}
PROG = "python -m experiments.math"


@dataclasses.dataclass(frozen=True)
class MathConfig(TrainConfig):
    task: str = "gsm8k"  # TASKS
    data: str = ""  # the training file (.parquet or .jsonl), required
    eval_data: str = ""  # the eval file; empty: the last eval_questions rows of --data
    levels: tuple[int, ...] = ()  # MATH only: keep these levels (1..5); empty: all
    types: tuple[str, ...] = ()  # MATH only: keep these types, e.g. Algebra,Geometry; empty: all
    model: str = ""  # a local Hugging Face Qwen2 directory, required
    num_train: int = 0  # the first num_train training rows; 0: all
    verify_timeout: float = 5.0  # seconds per math-verify comparison; past it the answer scores 0
    verify_workers: int = 0  # math-verify worker processes; 0: min(4, CPUs)
    scheme: str = "softmax"
    tau: float | str = 0.5
    # Countdown's `qwen` preset: a pretrained checkpoint wants a small RL rate and long answers.
    policy: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-6, warmup_steps=0)
    sft_learning_rate: float | None = 1e-5
    sft_steps: int = 0
    steps: int = 500
    questions_per_step: int = 32
    group_size: int = 8
    micro_batches: int = 8
    sampling: rollout.SamplingConfig = rollout.SamplingConfig(max_new_tokens=1024)
    eval_every: int = 50
    eval_questions: int = 500
    eval_batch: int = 16
    checkpoint_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        check(self.task in TASKS, f"task={self.task!r} is unknown; allowed: {', '.join(TASKS)}")
        check(bool(self.data), "data is required: a .parquet or .jsonl file of the task's public layout")
        check(bool(self.model), "model is required: a Hugging Face Qwen2 checkpoint directory")
        check(os.path.isdir(self.model), f"model={self.model} is not a directory")
        for name in ("config.json", "tokenizer.json"):
            check(os.path.isfile(os.path.join(self.model, name)),
                  f"model={self.model} is invalid; it has no {name} (expected a Hugging Face checkpoint directory)")
        check(self.task == "math" or not (self.levels or self.types),
              f"levels/types are invalid with task={self.task}; they filter MATH")
        check(all(1 <= x <= 5 for x in self.levels), f"levels={self.levels} is invalid; MATH levels are 1..5")
        check(self.num_train >= 0, f"num_train={self.num_train} is invalid; need >= 0")
        check(self.verify_timeout > 0, f"verify_timeout={self.verify_timeout} is invalid; need > 0")
        check(self.verify_workers >= 0, f"verify_workers={self.verify_workers} is invalid; need >= 0")


PRESETS = {
    # A few steps with any checkpoint, to see the pipeline run end to end.
    "smoke": dict(steps=2, sft_steps=2, questions_per_step=2, group_size=2, micro_batches=1, max_new_tokens=16,
                  eval_every=0, eval_questions=4, eval_batch=4, eval_k=2, num_train=40, checkpoint_every=2,
                  progress=False, sft_learning_rate=1e-2),
}


class MathTask:
    """GSM8K / MATH problems behind the loop's Task protocol: the chat prompt of envs.math_prompts
    rendered by the checkpoint's tokenizer, rewards by math-verify (envs.math_verify_reward)."""

    def __init__(self, train, test, tokenizer, stop_ids: tuple[int, ...], checker: AnswerChecker,
                 last_number_fallback: bool):
        self.splits = {"train": train, "eval": test}
        self.tok, self.checker, self.last_number_fallback = tokenizer, checker, last_number_fallback
        self.num_train, self.num_eval = len(train), len(test)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else stop_ids[0]
        self.stop_ids = stop_ids
        self.end = stop_ids[0]
        self.prompts = {s: [self._prompt(p) for p in ps] for s, ps in self.splits.items()}
        self.max_prompt_length = max(len(t) for ts in self.prompts.values() for t in ts)

    def _prompt(self, p) -> list[int]:
        messages, prefix = math_prompts.chat_prompt(p.question)
        return self.tok.encode(self.tok.apply_chat_template(messages) + prefix)

    def prompt_tokens(self, indices, split):
        return [self.prompts[split][i] for i in indices]

    def reference_tokens(self, indices, split):
        problems = [self.splits[split][i] for i in indices]
        return [self.tok.encode(math_prompts.sft_completion(p.reasoning, p.gold)) + [self.end] for p in problems]

    def score(self, indices, split, responses):
        golds = [self.splits[split][i].gold for i in indices]
        r = self.checker.rewards([self.decode(t) for t in responses], golds, self.last_number_fallback)
        return {"reward": r.reward, "format": r.format, "success": r.correct}

    def decode(self, tokens):
        return self.tok.decode([t for t in tokens if t not in self.stop_ids and t != self.pad_id])


def load_splits(cfg: MathConfig) -> tuple[list, list]:
    """(train, eval) problems: --data and --eval_data, or --data less its last eval_questions rows."""
    env = TASKS[cfg.task]
    kwargs = dict(levels=cfg.levels, types=cfg.types) if cfg.task == "math" else {}
    train = env.load(cfg.data, name="data", **kwargs)
    if cfg.eval_data:
        test = env.load(cfg.eval_data, name="eval_data", **kwargs)[: cfg.eval_questions]
    else:
        n = cfg.eval_questions
        if len(train) <= n:
            raise MathDataError(f"data={cfg.data} is invalid; it has {len(train)} rows (after filters), need more "
                                f"than eval_questions={n} to hold out an eval set (or pass --eval_data)")
        train, test = train[:-n], train[-n:]
    train = train[: cfg.num_train] if cfg.num_train else train
    if len(train) < cfg.questions_per_step:
        raise MathDataError(f"data={cfg.data} is invalid; it has {len(train)} training rows, fewer than "
                            f"questions_per_step={cfg.questions_per_step}")
    return train, test


def make_driver(cfg: MathConfig) -> Driver:
    """As experiments.countdown.make_driver; the data files are read before the run directory is made."""
    from flax import nnx

    distributed.initialize(cfg.distributed)
    make_mesh(cfg.mesh)
    train, test = load_splits(cfg)
    run_dir = prepare_run(cfg, f"math_{cfg.task}")
    # As experiments.countdown: --precision's compute dtype on float32 parameters, each read straight
    # into its sharding on the run's mesh.
    tok, model, stops = load_hf(cfg.model, dtype=PRECISIONS[cfg.precision], param_dtype="float32",
                                mesh=make_mesh(cfg.mesh))
    checker = AnswerChecker(workers=cfg.verify_workers, timeout_s=cfg.verify_timeout)
    task = MathTask(train, test, tok, stops, checker, TASKS[cfg.task].LAST_NUMBER_FALLBACK)
    graphdef, params = nnx.split(model)
    return Driver(LanguageTestbed(cfg, qwen2_policy(graphdef, model.cfg, remat=cfg.remat), params, task),
                  cfg, run_dir)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_flags(MathConfig, argv, presets=PRESETS, prog=PROG)
    try:
        driver = make_driver(cfg)
    except (ModelError, RunError, ValueError) as e:  # MathDataError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return run_and_report(driver)
    finally:
        driver.testbed.task.checker.close()


if __name__ == "__main__":
    main()
