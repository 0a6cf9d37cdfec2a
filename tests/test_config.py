"""Tests for rlsoft.config: typed frozen configs parsed from flags."""
import dataclasses
import json
import math
from typing import ClassVar

import pytest

from rlsoft.config import (FlagError, build_config, check, check_finite, config_diff, config_to_dict, flags_help,
                           parse_flags)


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


# --- Nested sections, aliases, JSON helpers ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Opt:
    FLAG_ALIASES: ClassVar[dict[str, str]] = {"lr": "learning_rate"}  # a section's own alias
    learning_rate: float = 1e-3
    b1: float = 0.9
    betas: tuple[float, ...] = (0.9, 0.999)
    name: str = "adamw"

    def __post_init__(self):
        check_finite(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite value > 0")
        check_finite(0 <= self.b1 < 1, "b1", self.b1, "0 <= value < 1")


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None


@dataclasses.dataclass(frozen=True)
class Inner:
    c: int = 0

    def __post_init__(self):
        check(self.c >= 0, f"c={self.c} is invalid; need >= 0")


@dataclasses.dataclass(frozen=True)
class Mid:
    b: Inner = Inner(c=1)
    d: str = "x"


@dataclasses.dataclass(frozen=True)
class Nested:
    FLAG_ALIASES: ClassVar[dict[str, str]] = {
        "learning_rate": "policy.learning_rate", "temperature": "sampling.temperature", "c": "a.b.c"}
    steps: int = 10
    policy: Opt = Opt()
    answerer: Opt = dataclasses.field(default_factory=lambda: Opt(learning_rate=1e-4))
    sampling: Sampling = Sampling()
    a: Mid = Mid()
    critic: Opt | None = None

    def __post_init__(self):
        check(self.steps >= 1, f"steps={self.steps} is invalid; allowed: an integer >= 1")


NESTED_PRESETS = {
    "dotted": {"steps": 2, "policy.learning_rate": 1e-2, "a.b.c": 5},
    "alias": {"learning_rate": 2e-2, "temperature": 0.5, "policy.lr": 2e-2},
    "dict": {"policy": {"b1": 0.5, "betas": [0.1, 0.2]}, "a": {"b": {"c": 7}}, "critic": {"lr": 0.3}},
    "instance": {"sampling": Sampling(temperature=2.0, top_k=3)},
    "clash": {"learning_rate": 1e-2, "policy.learning_rate": 3e-2},
    "unknown": {"policy.nope": 1},
}


def nbuild(*argv):
    return build_config(Nested, list(argv), presets=NESTED_PRESETS)


def one_error_line(capsys, argv, cls=Nested, presets=NESTED_PRESETS):
    """parse_flags must exit 2 with exactly one stderr line `prog: error: ...`; returns the message."""
    with pytest.raises(SystemExit) as info:
        parse_flags(cls, argv, presets=presets, prog="prog")
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "" and err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("prog: error: ")
    return err[len("prog: error: "):-1]


def test_nested_flags():
    assert nbuild() == Nested()
    cfg = nbuild("--policy.learning_rate=3e-4", "--answerer.b1", "0.5", "--sampling.temperature=0.7",
                 "--policy.betas=0.8,0.95", "--policy.name=sgd", "--sampling.top-k=5")
    assert cfg.policy == Opt(learning_rate=3e-4, betas=(0.8, 0.95), name="sgd")
    assert cfg.answerer == Opt(learning_rate=1e-4, b1=0.5)  # the default_factory's value is the base
    assert cfg.sampling == Sampling(temperature=0.7, top_k=5) and cfg.steps == 10
    assert nbuild("--sampling.top_k=none").sampling.top_k is None
    with pytest.raises(FlagError, match=r"^--policy.b1=x is invalid; expected a number$"):
        nbuild("--policy.b1=x")


def test_deep_nesting():
    assert nbuild("--a.b.c=3").a == Mid(b=Inner(c=3))
    assert nbuild("--a.d=y").a == Mid(b=Inner(c=1), d="y")  # the nested default (c=1) is kept
    with pytest.raises(FlagError, match=r"^a.b.c=-1 is invalid; need >= 0$"):
        nbuild("--a.b.c=-1")


def test_aliases_keep_flat_flags_working():
    assert nbuild("--learning_rate=3e-4").policy.learning_rate == 3e-4
    assert nbuild("--learning-rate", "3e-4") == nbuild("--policy.learning_rate=3e-4")
    assert nbuild("--temperature=0.5").sampling.temperature == 0.5
    assert nbuild("--c=4").a.b.c == 4
    assert nbuild("--policy.lr=0.2").policy.learning_rate == 0.2  # an alias inside a section
    assert nbuild("--answerer.lr=0.2").answerer.learning_rate == 0.2
    # Same value under both spellings is fine; the same spelling twice: the last one wins.
    assert nbuild("--learning_rate=1e-2", "--policy.learning_rate=0.01").policy.learning_rate == 0.01
    assert nbuild("--steps=2", "--steps=3").steps == 3


def test_alias_conflict_is_an_error(capsys):
    with pytest.raises(FlagError, match="both set policy.learning_rate"):
        nbuild("--policy.lr=1e-2", "--learning_rate=3e-2")
    assert one_error_line(capsys, ["--learning_rate=1e-2", "--policy.learning_rate=3e-2"]) == (
        "--learning_rate=1e-2 and --policy.learning_rate=3e-2 both set policy.learning_rate; give one")


@pytest.mark.parametrize("flag", ["policy.nope", "nope.x", "steps.x", "a.b.nope", "a.b.c.d", "policy.lr.x"])
def test_unknown_nested_flag(flag, capsys):
    message = f"--{flag} is not a flag of this experiment (see --help)"
    with pytest.raises(FlagError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        nbuild(f"--{flag}=1")
    assert one_error_line(capsys, [f"--{flag}=1"]) == message


@pytest.mark.parametrize("argv", [["--policy=3"], ["--policy"], ["--a.b=1"], ["--critic=sgd"], ["--critic"]])
def test_a_section_given_a_value_is_an_error(argv, capsys):
    assert "is a section" in one_error_line(capsys, argv)


@pytest.mark.parametrize("argv,message", [
    (["--policy.b1=1.5"], "policy.b1=1.5 is invalid; need 0 <= value < 1"),
    (["--learning_rate=-1"], "policy.learning_rate=-1.0 is invalid; need a finite value > 0"),
    (["--answerer.learning_rate=nan"], "answerer.learning_rate=nan is invalid; need a finite value > 0"),
    (["--a.b.c=-2"], "a.b.c=-2 is invalid; need >= 0"),
    (["--critic.b1=2"], "critic.b1=2.0 is invalid; need 0 <= value < 1"),
    (["--steps=0", "--policy.b1=0.5"], "steps=0 is invalid; allowed: an integer >= 1"),
])
def test_nested_validation_error_is_one_line_exit_2(argv, message, capsys):
    assert one_error_line(capsys, argv) == message


def test_optional_section():
    assert nbuild().critic is None and nbuild("--critic=none").critic is None
    assert nbuild("--critic.learning_rate=0.1").critic == Opt(learning_rate=0.1)  # from Opt's defaults
    with pytest.raises(FlagError, match="both set critic"):
        nbuild("--critic=none", "--critic.lr=0.1")
    assert nbuild("--preset=dict", "--critic=none").critic is None  # a flag overrides the preset


def test_presets_with_dotted_alias_dict_and_instance_keys():
    assert nbuild("--preset=dotted") == Nested(steps=2, policy=Opt(learning_rate=1e-2), a=Mid(b=Inner(c=5)))
    cfg = nbuild("--preset=alias")
    assert (cfg.policy.learning_rate, cfg.sampling.temperature) == (2e-2, 0.5)
    cfg = nbuild("--preset=dict")
    assert cfg.policy == Opt(b1=0.5, betas=(0.1, 0.2)) and cfg.a.b.c == 7  # a list becomes a tuple
    assert cfg.critic == Opt(learning_rate=0.3)
    assert nbuild("--preset=instance").sampling == Sampling(temperature=2.0, top_k=3)
    # Flags win over the preset whatever the spelling of either.
    assert nbuild("--preset=dotted", "--learning_rate=3e-4").policy.learning_rate == 3e-4
    assert nbuild("--c=9", "--preset=dict").a.b.c == 9
    with pytest.raises(FlagError, match="^preset clash: learning_rate=0.01 and policy.learning_rate=0.03 both set"):
        nbuild("--preset=clash")
    with pytest.raises(FlagError, match="^preset unknown: policy.nope is not a field"):
        nbuild("--preset=unknown")


def test_bad_alias_table_is_one_line(capsys):
    @dataclasses.dataclass(frozen=True)
    class BadTarget:
        FLAG_ALIASES: ClassVar[dict[str, str]] = {"lr": "policy.nope"}
        policy: Opt = Opt()

    @dataclasses.dataclass(frozen=True)
    class Shadow:
        FLAG_ALIASES: ClassVar[dict[str, str]] = {"steps": "policy.learning_rate"}
        steps: int = 1

    assert one_error_line(capsys, [], BadTarget, None) == "BadTarget.FLAG_ALIASES['lr'] = 'policy.nope' is not a field"
    assert one_error_line(capsys, ["--help"], Shadow, None) == "Shadow.FLAG_ALIASES['steps'] shadows the field steps"


def test_help_lists_dotted_names_and_aliases(capsys):
    text = flags_help(Nested, NESTED_PRESETS, "prog")
    for line in ["--policy.learning_rate=0.001   (float; alias --learning_rate; alias --policy.lr)",
                 "--answerer.learning_rate=0.0001   (float; alias --answerer.lr)",
                 "--policy.betas=0.9,0.999   (tuple[float, ...])", "--a.b.c=1   (int; alias --c)",
                 "--sampling.temperature=1.0   (float; alias --temperature)", "--critic=none   (optional Opt section)",
                 "--critic.learning_rate=0.001   (float; alias --critic.lr)", "--sampling.top_k=None   (int | None)"]:
        assert f"  {line}" in text.splitlines(), line
    assert "--policy=" not in text
    with pytest.raises(SystemExit) as info:
        parse_flags(Nested, ["--policy.nope=1", "--help"], presets=NESTED_PRESETS, prog="prog")
    assert info.value.code == 0 and capsys.readouterr().out.rstrip("\n") == text


def test_config_to_dict():
    cfg = nbuild("--policy.betas=1,inf,-inf", "--critic.lr=0.5", "--sampling.temperature=nan", "--preset=dict")
    d = config_to_dict(cfg)
    assert d["policy"] == {"learning_rate": 1e-3, "b1": 0.5, "betas": [1.0, "inf", "-inf"], "name": "adamw"}
    assert d["a"] == {"b": {"c": 7}, "d": "x"} and d["steps"] == 10 and "FLAG_ALIASES" not in d
    assert d["sampling"] == {"temperature": "nan", "top_k": None} and d["critic"]["learning_rate"] == 0.5
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # valid JSON: no bare NaN or Infinity
    assert config_to_dict(Nested())["critic"] is None


def test_config_diff():
    saved = json.loads(json.dumps(config_to_dict(nbuild("--policy.betas=1,2"))))
    assert config_diff(saved, config_to_dict(nbuild("--policy.betas=1,2"))) == {}
    assert config_diff(saved, nbuild("--policy.betas=1,2")) == {}  # a config itself is accepted too
    current = nbuild("--policy.betas=1,2", "--learning_rate=3e-4", "--a.b.c=2", "--critic.b1=0.5")
    assert config_diff(saved, config_to_dict(current)) == {
        "policy.learning_rate": (1e-3, 3e-4), "a.b.c": (1, 2), "critic": (None, None),
        "critic.learning_rate": (None, 1e-3), "critic.b1": (None, 0.5), "critic.betas": (None, [0.9, 0.999]),
        "critic.name": (None, "adamw")}
    # Fields present on one side only differ; nan equals nan; a tuple equals its list; True is not 1.
    assert config_diff({"x": 1, "gone": None}, {"x": 1, "new": 2}) == {"gone": (None, None), "new": (None, 2)}
    assert config_diff({"t": "nan", "v": [1, 2]}, {"t": math.nan, "v": (1, 2)}) == {}
    assert config_diff({"f": True}, {"f": 1}) == {"f": (True, 1)}


def test_check_finite():
    check_finite(True, "x", 1.0, "anything")
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=f"^x={value} is invalid; need a finite value > 0$"):
            check_finite(value > 0 or value != value, "x", value, "a finite value > 0")
    with pytest.raises(ValueError, match="^x=-1 is invalid; need > 0$"):
        check_finite(False, "x", -1, "> 0")
