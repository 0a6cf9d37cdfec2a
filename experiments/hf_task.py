"""What the language-model experiments share: a Hugging Face Qwen2 directory as a policy, and the run
with its before/after eval report (experiments.countdown, experiments.math).

    tok, model, stops = load_hf(model_dir)          # ModelError (one line) when it does not load
    policy = qwen2_policy(graphdef, model.cfg, remat=cfg.remat)
    result = run_and_report(driver)                 # warm start, eval, RL, eval, paired change
"""
from __future__ import annotations

import sys

from rlsoft import distributed, eval_stats
from rlsoft.driver import Driver
from rlsoft.train_loop import PolicyModel


class ModelError(ValueError):
    """A --model directory that does not load: bad config, tensors or tokenizer (a one-line message)."""


def qwen2_policy(graphdef, model_cfg=None, remat: str = "none") -> PolicyModel:
    """The testbed's view of a Qwen2: the segmented-cache sampler's decode functions, the blocked
    training forward and the group-shared-prompt response logits (benchmarks.train_step times these),
    each transformer block under jax.checkpoint with the `remat` policy (--remat); with `model_cfg`,
    the parameters' logical axes (models.qwen2_sharding) that --mesh shards by."""
    from models import qwen2_decode, qwen2_sharding, qwen2_train

    axes = {} if model_cfg is None else dict(param_axes=qwen2_sharding.logical_axes,
                                             axis_units=qwen2_sharding.axis_units(model_cfg))
    return PolicyModel(decode=qwen2_decode.decode_fns(graphdef),
                       forward=qwen2_train.train_forward(graphdef, remat=remat),
                       response_logits=qwen2_train.response_logits(graphdef, remat=remat), **axes)


def stop_ids(tok) -> tuple[int, ...]:
    """Ids that end a chat answer: `<|im_end|>` (ends the assistant turn; the warm-start targets end with
    the first stop id) then the eos token, each when the vocabulary has it."""
    ids = (tok.find_id("<|im_end|>"), tok.eos_id)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def load_hf(model_dir: str, dtype: str = "float32", param_dtype: str = "float32", mesh=None):
    """(tokenizer, model, stop ids) of a Hugging Face Qwen2 directory, computing in `dtype` on parameters
    in `param_dtype` (sharded on `mesh` by the rules when given); ModelError when it does not load."""
    from models import hf

    try:
        tok = hf.Tokenizer.from_dir(model_dir)
        stops = stop_ids(tok)
        tok.pad_id  # noqa: B018  (raises when tokenizer_config.json names a pad_token the vocabulary lacks)
        if not stops:
            raise ValueError("its tokenizer has neither <|im_end|> nor an eos_token (tokenizer_config.json)")
        model = hf.load_model(model_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"model={model_dir} is invalid; {reason}") from e
    if tok.vocab_size > model.cfg.vocab_size:
        raise ModelError(f"model={model_dir} is invalid; its tokenizer has {tok.vocab_size} tokens but the model "
                         f"only {model.cfg.vocab_size} embeddings")
    return tok, model, stops


def eval_line(label: str, o: dict) -> str:
    """`eval success <label>: 0.231 [0.205, 0.257]  mean@4: 0.198 [0.180, 0.216]  (95% CIs, 1024 problems)`."""
    s = o["success"]
    line = f"eval success {label} {eval_stats.format_interval(s.mean(), eval_stats.binomial_se(s))}"
    if "mean_at_k" in o:
        m = o["mean_at_k"]
        line += f"  mean@{o['k']}: {eval_stats.format_interval(m.mean(), eval_stats.mean_se(m))}"
    return line + f"  (95% CIs, {len(s)} problems)"


def change_line(after: dict, before: dict) -> str:
    """`eval success after - before (paired): +0.149 [+0.128, +0.170]  mean@4: ...`, over the same problems."""
    parts = [f"eval success after - before (paired): {eval_stats.format_interval(*eval_stats.paired(after['success'], before['success']), signed=True)}"]
    if "mean_at_k" in after and "mean_at_k" in before:
        d = eval_stats.paired(after["mean_at_k"], before["mean_at_k"])
        parts.append(f"mean@{after['k']}: {eval_stats.format_interval(*d, signed=True)}")
    return "  ".join(parts)


def outcomes(driver: Driver, fresh: bool) -> dict:
    """The per-problem outcomes of the current state: the driver's last eval, or a new one."""
    bed = driver.testbed
    o = bed.last_eval if not fresh and bed.last_eval is not None else bed.eval_outcomes(driver.state, driver.keys)
    return dict(o, k=driver.cfg.eval_k)


def run_and_report(driver: Driver) -> dict:
    """Warm start (the eval at the switch is "before RL"), RL, the eval after it and the paired change,
    printed once (process 0). A stop by signal closes the driver and exits 128 + signal."""
    cfg = driver.cfg
    before = after = None
    history = []
    say = print if distributed.is_primary() else (lambda *a, **k: None)  # results once, from process 0
    if driver.step <= cfg.sft_steps:
        warm = driver.run(until=cfg.sft_steps).history
        history += warm
        if driver.stopped is None:
            before = outcomes(driver, fresh=not (warm and "eval/success" in warm[-1]))
            say(eval_line("before RL:", before), flush=True)
    if driver.stopped is None:
        history += driver.run().history
    if driver.stopped is None:
        # The driver evaluates at the last step; a resumed run that had nothing left to do has not.
        after = outcomes(driver, fresh=not (history and "eval/success" in history[-1]))
        say(eval_line("after RL: ", after))
        if before is not None:
            say(change_line(after, before))
    driver.close()
    if driver.stopped is not None:
        print(f"stopped at step {driver.step}; resume with --resume", file=sys.stderr)
        raise SystemExit(128 + driver.stopped)
    success = lambda o: None if o is None else float(o["success"].mean())
    return dict(before=success(before), after=success(after), eval_before=before, eval_after=after,
                history=history, driver=driver, run_dir=driver.run_dir.path)
