"""models.char_gpt's config: unknown presets, unknown fields and bad values are one-line ValueErrors,
raised before any model is built (the model itself is tested in test_exhaustive.py)."""
import pytest

from models import char_gpt


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_unknown_preset():
    assert _error(char_gpt.CharGPTConfig.preset, "huge") == "preset='huge' is unknown; allowed: tiny, cpu, 20m"
    assert _error(char_gpt.validate_preset, "huge", "model_preset").startswith("model_preset='huge' is unknown")
    assert _error(char_gpt.validate_preset, None).startswith("preset=None is unknown")
    for name in char_gpt.PRESETS:
        char_gpt.validate_preset(name)
        assert char_gpt.CharGPTConfig.preset(name, vocab_size=65).vocab_size == 65


@pytest.mark.parametrize("overrides,word", [
    (dict(block_sz=8), "block_sz=8 is invalid; not a CharGPTConfig field"),
    (dict(block_size=0), "block_size=0 is invalid"),
    (dict(vocab_size=1), "vocab_size=1 is invalid"),
    (dict(n_embd=33), "n_embd=33 is invalid"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps=nan is invalid"),
    (dict(initializer_range=float("inf")), "initializer_range=inf is invalid"),
    (dict(initializer_range=-0.02), "initializer_range=-0.02 is invalid"),
    (dict(dtype="float16"), "dtype='float16' is invalid"),
])
def test_bad_overrides(overrides, word):
    assert word in _error(char_gpt.CharGPTConfig.preset, "tiny", **overrides)
