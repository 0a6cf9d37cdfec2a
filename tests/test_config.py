"""Tests for rlsoft.config: typed frozen configs parsed from flags."""
import dataclasses

import pytest

from rlsoft.config import FlagError, build_config, check, flags_help, parse_flags


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 10
    lr: float = 0.1
    verbose: bool = False
    name: str = "run"
    tau: float | str = 1.0
    schemes: tuple[str, ...] = ("linear", "softmax")
    taus: tuple[float, ...] = (0.5, 1.0)
    seed: int | None = None

    def __post_init__(self):
        check(self.steps >= 1, f"steps={self.steps} is invalid; allowed: an integer >= 1")
        if isinstance(self.tau, str):
            check(self.tau == "auto", f"tau={self.tau!r} is invalid; allowed: a float > 0 or 'auto'")
        else:
            check(self.tau > 0, f"tau={self.tau!r} is invalid; allowed: a float > 0 or 'auto'")
        check(all(t > 0 for t in self.taus), f"taus={self.taus} is invalid; allowed: floats > 0")


PRESETS = {"tiny": {"steps": 2, "name": "tiny", "taus": (0.1,)}, "auto": {"tau": "auto"}}


def build(*argv):
    return build_config(Cfg, list(argv), presets=PRESETS)


def test_defaults():
    assert build() == Cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        build().steps = 3


def test_equals_and_space_forms():
    assert build("--steps=3").steps == 3
    assert build("--steps", "3").steps == 3
    assert build("--lr", "-0.5").lr == -0.5  # a negative value is a value, not a flag
    cfg = build("--lr=2e-3", "--name", "x=y", "--steps=7")
    assert (cfg.lr, cfg.name, cfg.steps) == (2e-3, "x=y", 7)
    assert isinstance(build("--lr=1").lr, float)
    assert build("--name=a b").name == "a b"


def test_dashes_in_names_map_to_underscores():
    @dataclasses.dataclass(frozen=True)
    class D:
        num_steps: int = 1

    assert build_config(D, ["--num-steps=4"]).num_steps == 4


def test_bools():
    assert build("--verbose").verbose is True  # bare flag
    assert build("--verbose", "--steps=2") == Cfg(verbose=True, steps=2)  # bare flag before another flag
    for text, value in [("true", True), ("1", True), ("yes", True), ("On", True),
                        ("false", False), ("0", False), ("no", False), ("off", False)]:
        assert build(f"--verbose={text}").verbose is value, text
    assert build("--verbose", "false").verbose is False
    with pytest.raises(FlagError, match="verbose"):
        build("--verbose=maybe")


def test_float_or_str_union():
    assert build("--tau=auto").tau == "auto"
    tau = build("--tau=0.25").tau
    assert tau == 0.25 and isinstance(tau, float)
    assert isinstance(build("--tau", "2").tau, float)
    with pytest.raises(FlagError, match="tau"):  # parses as a str, then fails validation
        build("--tau=foo")
    with pytest.raises(FlagError, match="tau"):
        build("--tau=-1")


def test_optional():
    assert build("--seed=3").seed == 3
    assert build("--seed=none").seed is None
    with pytest.raises(FlagError, match="seed"):
        build("--seed=x")


def test_tuples():
    assert build("--schemes=rank,softmax,raw").schemes == ("rank", "softmax", "raw")
    assert build("--schemes", "rank").schemes == ("rank",)
    assert build("--schemes=rank, raw").schemes == ("rank", "raw")
    assert build("--schemes=").schemes == ()
    taus = build("--taus=0.1,2,1e-3").taus
    assert taus == (0.1, 2.0, 1e-3) and all(isinstance(t, float) for t in taus)
    with pytest.raises(FlagError, match="taus"):
        build("--taus=0.1,abc")
    with pytest.raises(FlagError, match="taus"):  # validation
        build("--taus=0.1,-2")


def test_presets_apply_first_then_flags_override():
    assert build("--preset=tiny") == Cfg(steps=2, name="tiny", taus=(0.1,))
    assert build("--preset=tiny", "--steps=5") == Cfg(steps=5, name="tiny", taus=(0.1,))
    # The order on the command line does not matter: flags always win over the preset.
    assert build("--steps=5", "--preset", "tiny") == Cfg(steps=5, name="tiny", taus=(0.1,))
    assert build("--preset=auto").tau == "auto"
    assert build("--preset=auto", "--tau=0.3").tau == 0.3
    with pytest.raises(FlagError, match="preset"):
        build("--preset=huge")
    with pytest.raises(FlagError, match="preset"):
        build_config(Cfg, ["--preset=tiny"])  # no presets given


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--nope=1"], "nope"),
        (["--steps=abc"], "steps"),
        (["--steps=1.5"], "steps"),
        (["--lr=fast"], "lr"),
        (["--steps"], "steps"),  # a non-bool flag needs a value
        (["steps=3"], "steps=3"),  # not a flag
        (["--steps=0"], "steps"),  # __post_init__ validation
    ],
)
def test_errors_are_one_line_flag_errors(argv, word):
    with pytest.raises(FlagError, match=word) as info:
        build(*argv)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_multiline_validation_message_is_cut_to_one_line():
    @dataclasses.dataclass(frozen=True)
    class M:
        x: int = 1

        def __post_init__(self):
            check(self.x > 0, f"x={self.x} is invalid\nsecond line\nthird line")

    with pytest.raises(FlagError) as info:
        build_config(M, ["--x=-1"])
    assert str(info.value) == "x=-1 is invalid"


def test_parse_flags_ok():
    assert parse_flags(Cfg, ["--steps=4", "--tau=auto"], presets=PRESETS) == Cfg(steps=4, tau="auto")


@pytest.mark.parametrize("argv", [["--nope"], ["--steps=abc"], ["--steps=0"], ["--preset=huge"], ["--tau=foo"]])
def test_parse_flags_error_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_flags(Cfg, argv, presets=PRESETS, prog="prog")
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prog: error: ")


def test_parse_flags_reads_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--steps=9"])
    assert parse_flags(Cfg).steps == 9


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as info:
        parse_flags(Cfg, ["--steps=abc", flag], presets=PRESETS, prog="prog")
    assert info.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: prog")
    for f in dataclasses.fields(Cfg):
        assert f"--{f.name}=" in out
    assert "--schemes=linear,softmax" in out
    assert "tiny" in out and "auto" in out
    assert out.rstrip("\n") == flags_help(Cfg, PRESETS, "prog")


def test_check():
    check(True, "never")
    with pytest.raises(ValueError, match="boom"):
        check(False, "boom")
