"""rlsoft's sampler against google-tunix's vanilla sampler on one random Qwen2 that transformers wrote
(benchmarks.peers): identical greedy tokens, and first-token logits within benchmarks.peers.PARITY_ATOL.
tunix is an optional peer (setup.py extra `peers`, installed in a venv of its own): without it the test
is skipped with that reason. Slow (~30 s with the peers: tunix's and transformers' imports take ~12 s),
so it runs in the slow pass (`-m slow`) wherever tunix is installed."""
import dataclasses

import numpy as np
import pytest

pytest.importorskip("tunix", reason='google-tunix is not installed (the peers extra: pip install -e ".[dev,peers]" '
                                    'in a venv of its own)')
pytest.importorskip("transformers", reason="transformers writes the model (the dev extra)")


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_len: int = 48  # prompts of 33..48 ids, left padded (benchmarks.rollout.make_prompts)


@pytest.mark.slow
def test_greedy_tokens_and_first_logits_match_tunix(tmp_path):
    from flax import nnx

    from benchmarks import peers_tunix
    from benchmarks.peers import PARITY_ATOL, greedy
    from benchmarks.rollout import build_models, make_prompts
    from models.qwen2_decode import decode_fns

    _, ours = build_models("tiny", str(tmp_path), seed=1)
    graphdef, state = nnx.split(ours)
    tokens, mask = make_prompts(Workload(), 8, ours.cfg.vocab_size, seed=1)
    assert not mask.all(), "some prompts are padded: the two left-padding paths are compared"
    n = 24
    ours_tokens, ours_logits = greedy(decode_fns(graphdef, chunk=8), state, tokens, mask, n)
    sampler = peers_tunix.make_sampler(peers_tunix.load_model(str(tmp_path)), tokens.shape[1], n)
    tunix_tokens, tunix_logits = peers_tunix.greedy(sampler, tokens, mask, n)
    assert ours_tokens.shape == tunix_tokens.shape == (8, n)
    np.testing.assert_array_equal(ours_tokens, tunix_tokens)
    np.testing.assert_allclose(ours_logits, tunix_logits, rtol=0, atol=PARITY_ATOL)
    assert np.abs(ours_logits).max() > 0.1  # real logits, not a zero buffer
