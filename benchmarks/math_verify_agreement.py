"""How often math-verify (envs.math_verify_reward) agrees with the plain string match, on a task's gold answers.

    python -m benchmarks.math_verify_agreement --task=gsm8k --data=gsm8k/test.jsonl
    python -m benchmarks.math_verify_agreement --task=math --data=math500/test.jsonl --out=agreement.json

Per problem i with gold answer g_i, three completions are judged twice, by the string match
(envs.math_verify_reward.normalize of the extracted answer == of the gold) and by math-verify (every
answer sent to it, no string shortcut):
  gold:      `</think>\\n<answer>\\boxed{g_i}</answer>`: the string match says right by construction,
             so agreement is math-verify's recall on the gold answers as written;
  reference: the dataset's own solution text (GSM8K's worked answer ending in `#### g`, read by the
             last-number fallback; MATH's solution, read by its last \\boxed{});
  other:     the gold of problem i + 1 (a wrong answer, unless the two golds are equal or equivalent).
Reported: the agreement rate of each, the count of disagreements each way, the time per call, the
timeouts, and the first disagreements.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from envs import gsm8k, hendrycks_math
from envs.math_data import read_records
from envs.math_verify_reward import AnswerChecker, extract_answer, normalize
from benchmarks.timing import write_json
from rlsoft.config import check, parse_flags

TASKS = {"gsm8k": gsm8k, "math": hendrycks_math}


@dataclasses.dataclass(frozen=True)
class AgreementConfig:
    task: str = "gsm8k"
    data: str = ""
    limit: int = 0  # the first `limit` problems; 0: all
    timeout_s: float = 5.0
    workers: int = 0
    show: int = 5  # disagreements printed per kind
    out: str = ""  # a JSON file for the figures

    def __post_init__(self):
        check(self.task in TASKS, f"task={self.task!r} is unknown; allowed: {', '.join(TASKS)}")
        check(bool(self.data), "data is required")
        check(self.limit >= 0 and self.show >= 0, "limit and show must be >= 0")


def completions(cfg: AgreementConfig) -> tuple[list[str], dict[str, list[str]]]:
    """(golds, {kind: completions}) of the file."""
    env = TASKS[cfg.task]
    problems = env.load(cfg.data)
    raw = read_records(cfg.data, ("question", "answer") if cfg.task == "gsm8k" else ("problem", "solution"))
    if cfg.limit:
        problems, raw = problems[: cfg.limit], raw[: cfg.limit]
    golds = [p.gold for p in problems]
    reference = [r["answer"] if cfg.task == "gsm8k" else r["solution"] for r in raw]
    if cfg.task == "math":  # the loader drops no row without filters, so rows and problems align
        assert [p.question for p in problems] == [r["problem"] for r in raw]
    boxed = lambda a: f"</think>\n<answer>\\boxed{{{a}}}</answer>"
    return golds, {"gold": [boxed(g) for g in golds], "reference": reference,
                   "other": [boxed(golds[(i + 1) % len(golds)]) for i in range(len(golds))]}


def main(argv=None) -> dict:
    cfg = parse_flags(AgreementConfig, argv, prog="python -m benchmarks.math_verify_agreement")
    golds, kinds = completions(cfg)
    fallback = TASKS[cfg.task].LAST_NUMBER_FALLBACK
    checker = AnswerChecker(workers=cfg.workers, timeout_s=cfg.timeout_s, shortcut=False)
    report = {"task": cfg.task, "data": cfg.data, "problems": len(golds)}
    try:
        for kind, texts in kinds.items():
            answers = [extract_answer(t, fallback) for t in texts]
            by_string = np.asarray([a is not None and normalize(a) == normalize(g) for a, g in zip(answers, golds)])
            checker.cache.clear()  # each kind timed on its own calls
            timeouts, start = checker.timeouts, time.perf_counter()
            by_verify = checker.check(golds, answers) > 0
            seconds = time.perf_counter() - start
            differ = np.flatnonzero(by_string != by_verify)
            report[kind] = dict(agreement=float(np.mean(by_string == by_verify)),
                                string_right=int(by_string.sum()), verify_right=int(by_verify.sum()),
                                verify_only=int(np.sum(by_verify & ~by_string)),
                                string_only=int(np.sum(by_string & ~by_verify)),
                                ms_per_call=1e3 * seconds / len(golds), timeouts=checker.timeouts - timeouts,
                                examples=[dict(gold=golds[i], answer=answers[i], string=bool(by_string[i]),
                                               verify=bool(by_verify[i])) for i in differ[: cfg.show]])
            r = report[kind]
            print(f"{kind:9s} agreement {r['agreement']:.4f}  string right {r['string_right']}  math-verify right "
                  f"{r['verify_right']}  (verify only {r['verify_only']}, string only {r['string_only']})  "
                  f"{r['ms_per_call']:.1f} ms/call  timeouts {r['timeouts']}")
            for e in r["examples"]:
                print(f"    gold {e['gold']!r}  answer {e['answer']!r}  string {e['string']}  math-verify {e['verify']}")
    finally:
        checker.close()
    write_json(report, cfg.out)
    return report


if __name__ == "__main__":
    main()
