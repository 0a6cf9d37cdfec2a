"""The research notes' claims as named sweeps: `python -m experiments.sweep --preset=<study>`.

Each study varies one thing at a time against its baseline arm (GRPO whitening, `linear`), on the
same seeds in every arm. Results land in results/<testbed>/<name>/ and the README's results blocks
are rebuilt from them with `python -m experiments.sweep report`.
"""
from __future__ import annotations

TAUS = (0.1, 0.25, 0.5, 0.75, 1.0, 2.0)


def arms(*pairs: tuple[str, str]) -> str:
    return "; ".join(f"{name}: {flags}" for name, flags in pairs)


def tau_arms(extra: str = "") -> str:
    """GRPO whitening, then softmax at every tau of notes 001 and tau = "auto" (where supported)."""
    pairs = [("grpo", f"--scheme=linear {extra}")]
    pairs += [(f"softmax{t:g}", f"--scheme=softmax --tau={t:g} {extra}") for t in TAUS]
    return arms(*pairs)


def quantile_arms(extra: str = "") -> str:
    """GRPO whitening vs the Gaussian quantile and quantile -> softmax (a TODO in notes 000)."""
    pairs = [("grpo", f"--scheme=linear {extra}"), ("quantile", f"--scheme=quantile {extra}")]
    pairs += [(f"quantile_softmax{t:g}", f"--scheme=quantile_softmax --tau={t:g} {extra}") for t in (0.25, 0.5, 1.0)]
    return arms(*pairs)


# The bandit's K = 1,000 arms, one paying, G = 16 draws a step, SGD: p(best) is exact.
BANDIT = "--arms=1000 --steps=1000 --group_size=16"
LRS = (1.0, 3.0, 10.0, 30.0)
# The char testbed's CPU defaults, 500 steps (TFDS cannot download here: the same text, local).
CHAR = "--steps=500 --eval_every=100 --checkpoint_every=0 --text_file=../shared/data/tinyshakespeare.txt"
LR_SCHEMES = (("linear", "linear", ""), ("softmax0.5", "softmax", "--tau=0.5"), ("softmax1", "softmax", "--tau=1"),
              ("softmax0.25", "softmax", "--tau=0.25"), ("softmax_centered0.25", "softmax_centered", "--tau=0.25"))

STUDIES = {
    "bandit_tau": dict(
        testbed="bandit", name="tau", seeds=20, common=BANDIT, arms=tau_arms("--lr=3"),
        title="Bandit: GRPO whitening vs softmax(R/tau), equal learning rate 3 (SGD), K = 1000, G = 16"),
    "bandit_quantile": dict(
        testbed="bandit", name="quantile", seeds=20, common=BANDIT, arms=quantile_arms("--lr=3"),
        title="Bandit: Gaussian quantile and quantile -> softmax against GRPO whitening, learning rate 3"),
    "bandit_lr": dict(
        testbed="bandit", name="lr", seeds=20, common=BANDIT, baseline="linear@lr3",
        arms=arms(*[(f"{label}@lr{lr:g}", f"--scheme={scheme} {tau} --lr={lr:g}")
                    for label, scheme, tau in LR_SCHEMES for lr in LRS]),
        title="Bandit: each scheme over learning rates 1-30 (is the gap a step-size gap?)"),
    # Each scheme at the learning rate bandit_lr picked for it, on NEW bandits (root key --seed=1), so
    # the choice is not scored on the seeds that made it.
    "bandit_tuned": dict(
        testbed="bandit", name="tuned", seeds=20, common=BANDIT + " --seed=1",
        arms=arms(("grpo@lr30", "--scheme=linear --lr=30"), ("softmax0.25@lr3", "--scheme=softmax --tau=0.25 --lr=3"),
                  ("softmax0.5@lr3", "--scheme=softmax --tau=0.5 --lr=3"),
                  ("softmax_centered0.25@lr30", "--scheme=softmax_centered --tau=0.25 --lr=30")),
        title="Bandit: each scheme at its own tuned learning rate (tuned on bandit_lr's seeds, scored on new ones)"),
    "bandit_recent": dict(
        testbed="bandit", name="recent", seeds=20, common=BANDIT,
        arms=arms(("grpo", "--scheme=linear --lr=3"), ("softmax0.25", "--scheme=softmax --tau=0.25 --lr=3"),
                  *[(f"risk_seeking{t:g}", f"--scheme=risk_seeking --tau={t:g} --lr=3") for t in (0.25, 1.0)],
                  *[(f"softmax_ess{f:g}", f"--scheme=softmax_ess --tau={f:g} --lr=3") for f in (0.25, 0.5)],
                  *[(f"gvpo{t:g}", f"--scheme=gvpo --tau={t:g} --lr=3") for t in (0.1, 0.5)],
                  *[(f"tpo{t:g}", f"--scheme=tpo --tau={t:g} --lr=3") for t in (0.5, 1.0)]),
        title="Bandit: the 2025-26 schemes (RS-GRPO, ESS-constrained softmax, GVPO, TPO) beside GRPO and softmax"),
    "char_tau": dict(
        testbed="char", name="tau", seeds=5, common=CHAR,
        arms=arms(("grpo", "--scheme=linear"), ("softmax0.25", "--scheme=softmax --tau=0.25"),
                  ("softmax0.5", "--scheme=softmax --tau=0.5"), ("softmax1", "--scheme=softmax --tau=1")),
        metrics=("eval/cross_entropy", "eval/top1", "train/expected_reward@end", "train/weights/effective_n@end"),
        title="Char GPT by RL from random weights: GRPO whitening vs softmax(R/tau), 500 steps"),
    "countdown_tau": dict(
        testbed="countdown", name="tau", seeds=5, common="--checkpoint_every=0", arms=tau_arms() + "; auto: "
        "--scheme=softmax --tau=auto",
        title="Countdown (tiny Qwen2, CPU default): GRPO whitening vs softmax(R/tau) and tau = auto"),
    "countdown_anneal": dict(
        testbed="countdown", name="anneal", seeds=5, common="--checkpoint_every=0",
        arms=arms(("softmax0.5", "--scheme=softmax --tau=0.5"),
                  ("anneal0.75to0.25", "--scheme=softmax --tau=0.75 --tau_end=0.25 --tau_schedule=linear")),
        title="Countdown: tau annealed 0.75 -> 0.25 against constant 0.5 (notes 001: 33% vs 38%)"),
    "countdown_quantile": dict(
        testbed="countdown", name="quantile", seeds=5, common="--checkpoint_every=0", arms=quantile_arms(),
        title="Countdown: Gaussian quantile and quantile -> softmax against GRPO whitening"),
    "countdown_teacher": dict(
        testbed="countdown", name="teacher", seeds=5, common="--preset=cold --checkpoint_every=0",
        arms=arms(("softmax", "--scheme=softmax --tau=0.5"),
                  ("sl0.1", "--scheme=softmax --tau=0.5 --sl_weight=0.1"),
                  ("sl1", "--scheme=softmax --tau=0.5 --sl_weight=1"),
                  ("inject_gt", "--scheme=softmax --tau=0.5 --inject_gt")),
        title="Countdown, cold start: does teacher forcing (sl_weight, ground truth in the group) lift 0%?"),
}

