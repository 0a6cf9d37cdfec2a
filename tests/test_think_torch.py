"""benchmarks.think_torch, the PyTorch reference step of the thinking-token testbed: shapes, one
finite step, and that the answerer learns the hand-made ("super") digit thoughts."""
import math

import pytest

torch = pytest.importorskip("torch")

from benchmarks.think_torch import TorchThinkConfig, TorchThinkStep, main  # noqa: E402

# One thread: the test machines' cores are shared, and torch's thread pool slows badly under load.
SMALL = dict(batch_size=8, group_size=4, threads=1)


def test_rollout_shapes_and_token_ranges():
    cfg = TorchThinkConfig(**SMALL)
    step = TorchThinkStep(cfg, seed=0)
    q, ans = step.questions()
    assert q.shape == (8, 2) and ans.shape == (8,)
    assert torch.equal(ans, q.sum(-1) % 100)
    rollouts, weights = step.rollout(q, ans)
    assert rollouts.shape == (8 * 4, 2 + 2) and weights.shape == (8 * 4,)
    assert torch.equal(rollouts[:, :2], q.repeat_interleave(4, 0))  # row b * G + g is question b
    thoughts = rollouts[:, 2:]
    assert bool(((thoughts >= 100) & (thoughts < 110)).all())  # thought ids only, no EOT, no ASK
    w = weights.view(8, 4)  # whitened per group: mean 0, population std 1 (or all 0 on ties)
    assert torch.allclose(w.mean(-1), torch.zeros(8), atol=1e-5)
    assert step.thinker(rollouts.clone()).shape == (32, 4, cfg.vocab)
    assert step.answer_logprobs(thoughts).shape == (32, 100)
    hand = step.hand_made(torch.tensor([0, 7, 42, 99]))
    assert hand.tolist() == [[100, 100], [100, 107], [104, 102], [109, 109]]


def test_one_step_is_finite_and_seeded():
    a = TorchThinkStep(TorchThinkConfig(**SMALL), seed=3)()
    b = TorchThinkStep(TorchThinkConfig(**SMALL), seed=3)()
    assert all(math.isfinite(x) for x in a) and a == b
    assert a[1] == pytest.approx(math.log(100), abs=0.5)  # untrained answerer: near uniform over 100


def test_think_len_must_fit_the_digits():
    with pytest.raises(ValueError):
        TorchThinkConfig(think_len=1)  # 99 needs two digit thoughts


def test_answerer_learns_the_hand_made_thoughts():
    # M = 100 as the default; G small since the answerer's update never sees the sampled thoughts.
    step = TorchThinkStep(TorchThinkConfig(batch_size=64, group_size=4, threads=1), seed=0)
    for _ in range(150):
        think_loss, answer_loss = step()
        assert math.isfinite(think_loss) and math.isfinite(answer_loss)
    assert step.answer_ce() < 0.5 * math.log(100)


def test_main_prints_a_rate(capsys):
    figures = main(["--seconds=0.2", "--batch_size=4", "--group_size=2", "--threads=1"])
    assert figures["steps_per_s"] > 0 and figures["steps"] >= 1
