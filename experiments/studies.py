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

# Thinking tokens (research notes 004): per modulus, thoughts to spell the answer in base 10, the
# batch the notes ask for, and steps; every arm's 5 seeds train as one population.
THINK_MODULI = {
    10: "--modulus=10 --max_thoughts=1 --batch_size=32 --steps=400 --chunk=100",
    100: "--modulus=100 --max_thoughts=2 --batch_size=64 --steps=1000 --chunk=100",
    1000: "--modulus=1000 --max_thoughts=3 --batch_size=64 --steps=1500 --chunk=100",
}
THINK_COMMON = ("--group_size=16 --thinker.learning_rate=1e-2 --answerer.learning_rate=3e-3 --eval_every=0 "
                "--checkpoint_every=0 --progress=false --test_questions=1000 --train_questions=256")
BSUPER = "--blind --super"
CLEAN = f"{BSUPER} --clean --scheme=softmax --tau=0.25"
# One variable at a time against blind_super_logp_softmax (the thinker's reward is log p(correct)).
THINK_ARMS = {
    "no_think": "--no_think",
    "blind_super_clean": CLEAN,
    "blind_super_logp_linear": f"{BSUPER} --scheme=linear",
    "blind_super_logp_softmax_tau0.25": f"{BSUPER} --scheme=softmax --tau=0.25",
    "blind_super_logp_softmax": f"{BSUPER} --scheme=softmax --tau=0.5",
    "blind_super_logp_softmax_tau1": f"{BSUPER} --scheme=softmax --tau=1.0",
    "blind_logp_softmax": "--blind --scheme=softmax --tau=0.5",
    "blind_super_clean_enumerate": f"{CLEAN} --search=enumerate",
    "blind_super_logp_softmax_enumerate": f"{BSUPER} --scheme=softmax --tau=0.5 --search=enumerate",
    # Enumeration scores V^T thoughts per question: at M = 100 that is 100 x the batch, so a smaller batch.
    "blind_super_clean_enumerate_b16": f"{CLEAN} --search=enumerate --batch_size=16 --steps=500",
    "blind_super_clean_mctx": f"{BSUPER} --clean --search=mctx --num_simulations=16",
    "blind_super_logp_mctx": f"{BSUPER} --search=mctx --num_simulations=16",
    "blind_logp_mctx": "--blind --search=mctx --num_simulations=16",
    "blind_super_logp_softmax_epsilon": f"{BSUPER} --scheme=softmax --tau=0.5 --epsilon=0.5 --epsilon_decay=0.995",
    "blind_super_logp_softmax_token_epsilon": f"{BSUPER} --scheme=softmax --tau=0.5 --token_epsilon=0.1",
    "blind_super_logp_softmax_no_entropy": f"{BSUPER} --scheme=softmax --tau=0.5 --entropy_coef=0",
    "blind_super_clean_b16": f"{CLEAN} --batch_size=16",
    "blind_super_clean_weight_decay": f"{CLEAN} --answerer.weight_decay=0.1 --thinker.weight_decay=0.1",
}
THINK_COMPARISONS = ("blind_super_clean - blind_super_logp_softmax; "  # does softmax over log p recover clean?
                     "blind_super_clean_enumerate - blind_super_clean; blind_super_clean_mctx - blind_super_clean; "
                     "no_think - blind_super_clean [accuracy]")


def think_study(modulus: int, names, comparisons: str = THINK_COMPARISONS, baseline: str = "") -> dict:
    return dict(testbed="think", name=f"m{modulus}", seeds=5, common=f"{THINK_MODULI[modulus]} {THINK_COMMON}",
                arms=arms(*[(n, THINK_ARMS[n]) for n in names]), baseline=baseline or names[0],
                comparisons=comparisons,
                title=f"Thinking tokens on modular addition, M = {modulus}: every arm one population of 5 seeds")


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
    "think_m10": think_study(10, [n for n in THINK_ARMS if not n.endswith(("_b16", "_weight_decay"))],
                             baseline="blind_super_logp_softmax"),
    "think_m100": think_study(100, ["no_think", "blind_super_clean", "blind_super_clean_enumerate_b16"],
                              comparisons="no_think - blind_super_clean [accuracy]", baseline="blind_super_clean"),
    # Notes 004: M = 1000 needs batch >= 64 and no weight decay (not run on this CPU: compute).
    "think_m1000": think_study(1000, ["blind_super_clean", "blind_super_clean_b16", "blind_super_clean_weight_decay",
                                      "no_think"], comparisons="no_think - blind_super_clean [accuracy]"),
    "char_tau": dict(
        testbed="char", name="tau", seeds=5, common=CHAR,
        arms=tau_arms() + "; auto: --scheme=softmax --tau=auto",
        metrics=("eval/cross_entropy", "eval/top1", "train/expected_reward@end", "train/weights/effective_n@end",
                 "train/entropy@end"),
        title="Char GPT by RL from random weights: GRPO whitening vs softmax(R/tau) and tau = auto, 500 steps"),
    "countdown_tau": dict(
        # softmax_centered0.5: the same weights minus their mean (zero-sum), the drift diagnostic.
        testbed="countdown", name="tau", seeds=5, common="--checkpoint_every=0", arms=tau_arms() + "; auto: "
        "--scheme=softmax --tau=auto; softmax_centered0.5: --scheme=softmax_centered --tau=0.5",
        title="Countdown (tiny Qwen2, CPU default): GRPO whitening vs softmax(R/tau) and tau = auto"),
    "countdown_anneal": dict(
        testbed="countdown", name="anneal", seeds=5, common="--checkpoint_every=0",
        arms=arms(("softmax0.5", "--scheme=softmax --tau=0.5"),
                  ("anneal0.75to0.25", "--scheme=softmax --tau=0.75 --tau_end=0.25 --tau_schedule=linear")),
        title="Countdown: tau annealed 0.75 -> 0.25 against constant 0.5 (notes 001: 33% vs 38%)"),
    "countdown_quantile": dict(
        testbed="countdown", name="quantile", seeds=5, common="--checkpoint_every=0", arms=quantile_arms(),
        title="Countdown: Gaussian quantile and quantile -> softmax against GRPO whitening"),
    # Each scheme over AdamW rates around the default 2e-4. Adam normalises the step per parameter,
    # so unlike the bandit's SGD a scheme's weight scale barely sets its step size here: what is
    # left to tune is the rate itself. Picked and scored on the same seeds (no held-out seeds: compute).
    "countdown_lr": dict(
        testbed="countdown", name="lr", seeds=5, common="--checkpoint_every=0", baseline="grpo@lr2e-4",
        arms=arms(*[(f"{label}@lr{lr}", f"{flags} --learning_rate={lr}")
                    for label, flags in (("grpo", "--scheme=linear"),
                                         ("softmax_centered0.5", "--scheme=softmax_centered --tau=0.5"),
                                         ("softmax0.25", "--scheme=softmax --tau=0.25"))
                    for lr in ("1e-4", "2e-4", "4e-4")]),
        title="Countdown: each scheme at AdamW learning rates 1e-4, 2e-4 (the default), 4e-4"),
    "countdown_teacher": dict(
        testbed="countdown", name="teacher", seeds=5, common="--preset=cold --checkpoint_every=0",
        arms=arms(("softmax", "--scheme=softmax --tau=0.5"),
                  ("sl0.1", "--scheme=softmax --tau=0.5 --sl_weight=0.1"),
                  ("sl1", "--scheme=softmax --tau=0.5 --sl_weight=1"),
                  ("inject_gt", "--scheme=softmax --tau=0.5 --inject_gt"),
                  # The control: the same supervised term with the policy gradient off (does RL add?).
                  ("sl1_only", "--scheme=softmax --tau=0.5 --sl_weight=1 --rl_weight=0")),
        comparisons="inject_gt - sl1; sl1 - sl1_only",
        # train/success@end: the sampled (T = 1) success of the last 10% of RL steps, beside greedy eval.
        metrics=("eval/success", "eval/mean_at_k", "train/success@end", "train/reward@mean",
                 "train/weights/effective_n@mean", "train/entropy@end", "train/completions/mean_length@end",
                 "train/grad_norm@mean"),
        title="Countdown, cold start: does teacher forcing (sl_weight, ground truth in the group) lift 0%?"),
}

