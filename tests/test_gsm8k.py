"""GSM8K: the public layouts (JSONL and parquet), gold answers, rewards, bad files, and a smoke run of
`python -m experiments.math --task=gsm8k` on a tiny random Hugging Face Qwen2."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from envs import gsm8k, math_prompts
from envs.math_data import MathDataError
from envs.math_verify_reward import AnswerChecker, extract_answer
from math_fixtures import GSM8K_ROWS, prompt_corpus, write_checkpoint, write_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checker():
    c = AnswerChecker(workers=1, timeout_s=5)
    yield c
    c.close()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_load_both_layouts(tmp_path, suffix):
    problems = gsm8k.load(write_rows(tmp_path / f"test{suffix}", GSM8K_ROWS))
    assert [p.gold for p in problems] == ["13", "1000", "3.5", "-5"]
    assert problems[0].question == GSM8K_ROWS[0]["question"]
    # The calculator annotations <<...>> are not part of the warm-start reasoning.
    assert problems[1].reasoning == "It sells 250 * 4 = 1000 pens."


def test_gold_answer():
    assert gsm8k.gold_answer("a\n#### 1,234,567") == "1234567"
    assert gsm8k.gold_answer("x #### 2 #### 3") == "3"
    assert gsm8k.gold_answer("no marker") is None and gsm8k.gold_answer("####  ") is None


@pytest.mark.parametrize("completion,gold,correct", [
    ("16 - 3 = 13</think>\n<answer>\\boxed{13}</answer>", "13", 1),
    ("</think>\n<answer>13</answer>", "13", 1),
    ("so the answer is 1,000 pens.", "1000", 1),  # the last number, thousands comma dropped
    ("</think>\n<answer>\\boxed{1,000}</answer>", "1000", 1),
    ("</think>\n<answer>\\boxed{\\frac{7}{2}}</answer>", "3.5", 1),
    ("</think>\n<answer>\\boxed{3.50}</answer>", "3.5", 1),
    ("it is -5 degrees", "-5", 1),
    ("it is 5 degrees", "-5", 0),
    ("</think>\n<answer>\\boxed{12}</answer> 13", "13", 0),  # the answer block counts, not a later number
    ("13 eggs, then 14", "13", 0),
    ("no number at all", "13", 0),
])
def test_reward_right_wrong_and_equivalent(checker, completion, gold, correct):
    r = checker.rewards([completion], [gold], last_number_fallback=gsm8k.LAST_NUMBER_FALLBACK)
    assert r.correct[0] == correct, (completion, extract_answer(completion, True))
    np.testing.assert_allclose(r.reward, 0.1 * r.format + r.correct)


def test_reference_completion_scores_full_reward(tmp_path, checker):
    problems = gsm8k.load(write_rows(tmp_path / "t.jsonl", GSM8K_ROWS))
    texts = [math_prompts.sft_completion(p.reasoning, p.gold) for p in problems]
    r = checker.rewards(texts, [p.gold for p in problems], last_number_fallback=True)
    np.testing.assert_allclose(r.reward, 1.1, rtol=1e-6)


def _bad(tmp_path, kind):
    path = tmp_path / "bad.jsonl"
    if kind == "missing":
        return str(tmp_path / "nope.jsonl")
    if kind == "directory":
        return str(tmp_path)
    if kind == "not_json":
        path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    elif kind == "no_column":
        write_rows(path, [{"question": "q", "solution": "#### 1"}])
    elif kind == "no_marker":
        write_rows(path, [{"question": "q", "answer": "1"}])
    elif kind == "not_string":
        write_rows(path, [{"question": "q", "answer": 5}])
    elif kind == "empty":
        path.write_text("")
    elif kind == "not_parquet":
        path = tmp_path / "bad.parquet"
        path.write_text("PAR1 garbage")
    elif kind == "extension":
        path = tmp_path / "bad.csv"
        path.write_text("question,answer\n")
    return str(path)


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"), ("directory", "is a directory"), ("not_json", "line 2 is not a JSON object"),
    ("no_column", "row 0 has no field 'answer'"), ("no_marker", "no final answer after '####'"),
    ("not_string", "field 'answer' is int"), ("empty", "no rows"), ("not_parquet", "not a readable parquet"),
    ("extension", "unknown extension '.csv'"),
])
def test_bad_file_is_one_line(tmp_path, kind, message):
    path = _bad(tmp_path, kind)
    with pytest.raises(MathDataError) as e:
        gsm8k.load(path)
    text = str(e.value)
    assert text.startswith(f"data={path} is invalid; ") and message in text and "\n" not in text, text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gsm8k")
    data = write_rows(d / "train.jsonl", GSM8K_ROWS * 3)
    model = write_checkpoint(str(d / "tiny-qwen2"), prompt_corpus(gsm8k.load(data)))
    return model, data


@pytest.mark.slow  # ~60 s on 2 busy cores: the warm-start, RL and eval programs compile
def test_smoke_run_through_the_driver(ckpt, tmp_path, capsys):
    from experiments import math as math_experiment

    model, data = ckpt
    eval_data = write_rows(tmp_path / "test.parquet", GSM8K_ROWS)
    result = math_experiment.main([f"--model={model}", "--task=gsm8k", f"--data={data}", f"--eval_data={eval_data}",
                                   "--preset=smoke", f"--logdir={tmp_path}", "--compile_cache="])
    out = capsys.readouterr().out
    assert "eval success before RL" in out and "eval success after RL" in out and "mean@2" in out
    history = result["history"]
    assert len(history) == 4 and sum("train/reward" in h for h in history) == 2
    assert all(np.isfinite(h.get("train/loss", h.get("sft/loss"))) for h in history)
    task = result["driver"].testbed.task
    assert task.num_eval == 4 and task.num_train == 12
    # The checkpoint's template renders the prompt; the reference answer scores 1.1 through the task.
    text = task.tok.decode(task.prompt_tokens([0], "eval")[0], skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n" + math_prompts.RESPONSE_PROMPT)
    ref = task.reference_tokens([1], "eval")[0]
    np.testing.assert_allclose(task.score([1], "eval", [ref])["reward"], [1.1], rtol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--data=/nonexistent.jsonl"], "data=/nonexistent.jsonl is invalid; no such file"),
    (["--task=gsm8k", "--levels=5"], "levels/types are invalid with task=gsm8k"),
    (["--task=chess"], "task='chess' is unknown"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    model = tmp_path / "model"  # the config checks only that these files exist; the data fails first
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    data = write_rows(tmp_path / "train.jsonl", GSM8K_ROWS)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.math", f"--model={model}", f"--data={data}", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("python -m experiments.math: error: ") and message in err[0], err
