"""Bad Countdown parquet input: every class of problem raises CountdownDataError (a ValueError) with
ONE line `data=<file> is invalid; <problem>`, never a pyarrow traceback. Small bad files are written
with pyarrow into tmp_path; the round trip of good data is in test_countdown_env.py."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs import countdown as cd
from envs.countdown_data import CountdownDataError, MissingDataError

GOOD = {"nums": pa.array([[3, 5, 7], [1, 2, 3, 4]] * 3, pa.list_(pa.int64())), "target": pa.array([22, 10] * 3)}


def _table(**cols):
    return pa.table({**GOOD, **cols})


def _file(tmp_path, table, name="x.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def _raises(path, word, cls=CountdownDataError, **kwargs) -> str:
    with pytest.raises(cls) as info:
        cd.load_parquet(path, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg, msg
    assert msg.startswith(f"data={path} is invalid; "), msg
    assert word in msg, msg
    return msg


def test_missing_path_is_a_value_error_and_a_file_not_found_error(tmp_path):
    msg = _raises(tmp_path / "nope.parquet", "no such file", MissingDataError, test_size=1)
    assert issubclass(MissingDataError, FileNotFoundError)
    assert msg == f"data={tmp_path / 'nope.parquet'} is invalid; no such file or directory"


def test_not_a_parquet(tmp_path):
    (tmp_path / "x.txt").write_text("nums,target\n1 2,3\n")
    _raises(tmp_path / "x.txt", "not a readable parquet", test_size=1)
    (tmp_path / "zero.parquet").write_bytes(b"")
    _raises(tmp_path / "zero.parquet", "not a readable parquet", test_size=1)
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "no parquet columns", test_size=1)
    root = tmp_path / "root"  # GRPO-Zero's <root>/data layout, holding a file that is not parquet
    (root / "data").mkdir(parents=True)
    (root / "data" / "part-0.parquet").write_text("not parquet at all")
    with pytest.raises(CountdownDataError, match=f"data={root / 'data'} is invalid; it is not a readable parquet"):
        cd.load_parquet(root, test_size=1)


def test_missing_columns(tmp_path):
    path = _file(tmp_path, pa.table({"a": [1], "b": [2]}))
    msg = _raises(path, "no column", test_size=1)
    assert msg == f"data={path} is invalid; it has no column 'nums' (has: a, b)"
    path = _file(tmp_path, pa.table({"nums": GOOD["nums"], "answer": GOOD["target"]}), "t.parquet")
    assert _raises(path, "no column", test_size=1).endswith("it has no column 'target' (has: nums, answer)")


@pytest.mark.parametrize("cols,word", [
    (dict(nums=pa.array([[1.5, 2.0]] * 6)), "column 'nums' has type list<element: double>; need a list of integers"),
    (dict(nums=pa.array([1, 2, 3, 4, 5, 6])), "column 'nums' has type int64"),
    (dict(nums=pa.array([["1", "2"]] * 6)), "column 'nums' has type list<element: string>"),
    (dict(target=pa.array(["22"] * 6)), "column 'target' has type string; need integers"),
    (dict(target=pa.array([22.0] * 6)), "column 'target' has type double"),
])
def test_wrong_column_types(tmp_path, cols, word):
    _raises(_file(tmp_path, _table(**cols)), word, test_size=1)


def test_no_rows(tmp_path):
    empty = pa.table({"nums": pa.array([], pa.list_(pa.int64())), "target": pa.array([], pa.int64())})
    _raises(_file(tmp_path, empty), "it has no rows", test_size=1)


@pytest.mark.parametrize("nums,target,word", [
    ([[3, 5, 7], None], [22, 10], "row 1 has an empty (null) cell"),
    ([[3, 5, 7], [1, 2]], [22, None], "row 1 has an empty (null) cell"),
    ([[3, None, 7], [1, 2]], [22, 10], "row 0 has an empty (null) cell"),
    ([[3, 5, 7], [4]], [22, 4], "row 1 has nums=[4]; need 2..6 numbers"),
    ([[3, 5, 7], [1, 2, 3, 4, 5, 6, 7]], [22, 4], "row 1 has nums=[1, 2, 3, 4, 5, 6, 7]"),
    ([[3, -5, 7], [1, 2]], [22, 3], "row 0 has nums=[3, -5, 7]; need 2..6 numbers in 0..999999999"),
    ([[3, 10**9], [1, 2]], [22, 3], "row 0 has nums=[3, 1000000000]"),
])
def test_bad_rows(tmp_path, nums, target, word):
    table = pa.table({"nums": pa.array(nums, pa.list_(pa.int64())), "target": pa.array(target, pa.int64())})
    _raises(_file(tmp_path, table), word, test_size=1)


def test_too_few_rows_for_the_test_split(tmp_path):
    path = _file(tmp_path, _table())
    assert _raises(path, "rows") == f"data={path} is invalid; it has 6 rows, need more than test_size=128"
    train, test = cd.load_parquet(path, test_size=5)
    assert len(train) == 1 and len(test) == 5 and test[-1].nums == (1, 2, 3, 4)
    for bad in (0, -1, True, 1.5):  # an argument error, not a data error
        with pytest.raises(ValueError, match="test_size") as info:
            cd.load_parquet(path, test_size=bad)
        assert not isinstance(info.value, CountdownDataError)


def test_flag_name_and_int32_lists(tmp_path):
    ok = pa.table({"nums": pa.array([[3, 5, 7]] * 3, pa.list_(pa.int32())), "target": pa.array([22] * 3, pa.int16())})
    train, _ = cd.load_parquet(_file(tmp_path, ok), test_size=1)
    assert train[0].nums == (3, 5, 7) and train[0].target == 22
    with pytest.raises(CountdownDataError, match=r"^--countdown_data=.* is invalid; no such file"):
        cd.load_parquet(tmp_path / "nope", name="--countdown_data")
