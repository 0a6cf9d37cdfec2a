"""The thinking-token results table: each row x modulus trained as one population of seeds.

    python -m experiments.think_sweep --moduli=10,100 --seeds=5            # run the missing cells, then the table
    python -m experiments.think_sweep --table_only                          # the table from the files alone

Every cell (a row of flags at one modulus) runs `experiments.think` once with `--population=seeds`
(seeds 0 .. seeds-1, the same seeds in every cell) and writes `<out>/<row>-M<modulus>.json`: the
flags, each member's final eval metrics, the last training metrics and the wall time. A cell whose
file exists is not run again, so an interrupted sweep continues where it stopped. The table
(`<out>/table.md`) gives, for each metric, the mean over seeds and its 95% stratified-bootstrap CI
(`rlsoft.stats`, rliable), read from the files only.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from experiments import think
from rlsoft import stats
from rlsoft.config import check, parse_flags

PROG = "python -m experiments.think_sweep"

# Per modulus: thoughts to spell the answer in base 10, the batch the notes ask for, and steps.
MODULI = {
    10: ["--modulus=10", "--max_thoughts=1", "--batch_size=32", "--steps=400", "--chunk=100"],
    100: ["--modulus=100", "--max_thoughts=2", "--batch_size=64", "--steps=1000", "--chunk=100"],
    1000: ["--modulus=1000", "--max_thoughts=3", "--batch_size=64", "--steps=1500", "--chunk=100"],
}
COMMON = ["--group_size=16", "--thinker.learning_rate=1e-2", "--answerer.learning_rate=3e-3", "--eval_every=0",
          "--checkpoint_every=0", "--progress=false", "--test_questions=1000", "--train_questions=256"]
BSUPER = ["--blind", "--super"]
# One variable at a time against "blind_super_clean" / "blind_super_logp_softmax".
ROWS = {
    "no_think": ["--no_think"],
    "blind_super_clean": BSUPER + ["--clean", "--scheme=softmax", "--tau=0.25"],
    "blind_super_logp_linear": BSUPER + ["--scheme=linear"],
    "blind_super_logp_softmax_tau0.25": BSUPER + ["--scheme=softmax", "--tau=0.25"],
    "blind_super_logp_softmax": BSUPER + ["--scheme=softmax", "--tau=0.5"],
    "blind_super_logp_softmax_tau1": BSUPER + ["--scheme=softmax", "--tau=1.0"],
    "blind_logp_softmax": ["--blind", "--scheme=softmax", "--tau=0.5"],
    "blind_super_clean_enumerate": BSUPER + ["--clean", "--scheme=softmax", "--tau=0.25", "--search=enumerate"],
    "blind_super_logp_softmax_enumerate": BSUPER + ["--scheme=softmax", "--tau=0.5", "--search=enumerate"],
    # Enumeration scores V^T thoughts per question: at M = 100 that is 100 x the batch, so a smaller batch.
    "blind_super_clean_enumerate_b16": BSUPER + ["--clean", "--scheme=softmax", "--tau=0.25", "--search=enumerate",
                                                 "--batch_size=16", "--steps=500"],
    "blind_super_clean_mctx": BSUPER + ["--clean", "--search=mctx", "--num_simulations=16"],
    "blind_super_logp_mctx": BSUPER + ["--search=mctx", "--num_simulations=16"],
    "blind_logp_mctx": ["--blind", "--search=mctx", "--num_simulations=16"],
    "blind_super_logp_softmax_epsilon": BSUPER + ["--scheme=softmax", "--tau=0.5", "--epsilon=0.5",
                                                  "--epsilon_decay=0.995"],
    "blind_super_logp_softmax_token_epsilon": BSUPER + ["--scheme=softmax", "--tau=0.5", "--token_epsilon=0.1"],
    "blind_super_logp_softmax_no_entropy": BSUPER + ["--scheme=softmax", "--tau=0.5", "--entropy_coef=0"],
    "blind_super_clean_weight_decay": BSUPER + ["--clean", "--scheme=softmax", "--tau=0.25",
                                                "--answerer.weight_decay=0.1", "--thinker.weight_decay=0.1"],
}
# Paired differences (same seeds in both cells): one variable at a time.
COMPARISONS = (
    ("blind_super_logp_softmax", "blind_super_logp_linear", "train_accuracy"),  # weighting scheme
    ("blind_super_clean", "blind_super_logp_softmax", "train_accuracy"),  # does softmax recover clean?
    ("blind_super_logp_softmax_enumerate", "blind_super_logp_softmax", "train_accuracy"),  # search
    ("blind_super_logp_mctx", "blind_super_logp_softmax", "train_accuracy"),
    ("blind_super_logp_softmax", "blind_logp_softmax", "train_accuracy"),  # super
    ("blind_super_logp_softmax", "blind_super_logp_softmax_no_entropy", "train_accuracy"),  # entropy bonus
    ("blind_super_logp_softmax", "blind_super_logp_softmax_epsilon", "train_accuracy"),  # exploration
    ("no_think", "blind_super_clean", "accuracy"),  # held out: thinking vs answering directly
)
METRICS = ("accuracy", "train_accuracy", "hand_accuracy", "shuffled_accuracy", "hand_match", "thought_entropy",
           "mutual_information")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    moduli: tuple[int, ...] = (10,)
    rows: tuple[str, ...] = tuple(ROWS)
    seeds: int = 5
    out: str = "results/think"
    table_only: bool = False

    def __post_init__(self):
        bad = [m for m in self.moduli if m not in MODULI]
        check(not bad, f"moduli={bad[0] if bad else ''} is invalid; allowed: {', '.join(map(str, MODULI))}")
        unknown = [r for r in self.rows if r not in ROWS]
        check(not unknown, f"rows={unknown[0] if unknown else ''} is unknown; allowed: {', '.join(ROWS)}")
        check(self.seeds >= 1, f"seeds={self.seeds} is invalid; need >= 1")


def cell_flags(row: str, modulus: int, seeds: int) -> list[str]:
    return MODULI[modulus] + COMMON + ROWS[row] + [f"--population={seeds}", "--seed=0"]


def run_cell(row: str, modulus: int, seeds: int, out: str) -> dict:
    flags = cell_flags(row, modulus, seeds)
    start = time.time()
    result = think.main(flags)
    last = {k: v for k, v in result["history"][-1].items() if k.startswith("train/")}
    record = dict(row=row, modulus=modulus, flags=flags, seeds=list(range(seeds)),
                  final={k: [float(x) for x in v] for k, v in result["final"].items()},
                  last_train=last, wall_s=round(time.time() - start, 1), load_average=os.getloadavg()[0])
    path = os.path.join(out, f"{row}-M{modulus}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)  # a cell file is complete or absent
    return record


def table(out: str) -> str:
    """Markdown: one line per cell file, each metric as mean [95% CI] over its seeds."""
    records = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.json")))]
    order = {r: i for i, r in enumerate(ROWS)}
    records.sort(key=lambda r: (r["modulus"], order.get(r["row"], len(order))))
    head = ["M", "row", "seeds"] + list(METRICS) + ["wall s"]
    lines = [f"# Thinking tokens on modular addition: every row x modulus, {PROG}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [str(r["modulus"]), r["row"], str(len(r["seeds"]))]
        for m in METRICS:
            v = r["final"].get(m)
            cells.append("-" if v is None else stats.interval(np.asarray(v)).format(2))
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = {(r["row"], r["modulus"]): r for r in records}
    diffs = [(a, b, m, mod) for mod in sorted({r["modulus"] for r in records}) for a, b, m in COMPARISONS
             if (a, mod) in cells and (b, mod) in cells]
    if diffs:
        lines += ["", "| M | A - B (paired over shared seeds) | metric | mean [95% CI] |", "|---|---|---|---|"]
        for a, b, m, mod in diffs:
            d = stats.paired_difference(cells[a, mod]["final"][m], cells[b, mod]["final"][m])
            lines.append(f"| {mod} | {a} - {b} | {m} | {d.format(2)} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    cfg = parse_flags(SweepConfig, argv, prog=PROG)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        print(f"{PROG}: error: out={cfg.out} is not writable: {e.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    if not cfg.table_only:
        for m in cfg.moduli:
            for row in cfg.rows:
                if os.path.exists(os.path.join(cfg.out, f"{row}-M{m}.json")):
                    continue
                print(f"== {row} M={m}: {' '.join(cell_flags(row, m, cfg.seeds))}", flush=True)
                record = run_cell(row, m, cfg.seeds, cfg.out)
                print(f"   accuracy {np.round(record['final']['accuracy'], 3)}  {record['wall_s']} s", flush=True)
    text = table(cfg.out)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
