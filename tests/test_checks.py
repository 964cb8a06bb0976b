"""The integer check every module's refusals go through."""

import numpy as np
import pytest

from jattn._checks import check_bool, check_int


def test_integers_come_back_as_python_ints():
    for value in (3, np.int64(3), np.int32(3), np.uint8(3)):
        assert check_int("n", value) == 3 and type(check_int("n", value)) is int
    assert check_int("n", 0, minimum=0) == 0
    assert check_int("n", -2, minimum=-5) == -2


@pytest.mark.parametrize("value", [True, 2.0, "2", None, np.float32(2), np.array([2])])
def test_non_integers_are_a_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match=f"block must be an int, got {type(value).__name__}"):
        check_int("block", value)


def test_values_below_the_minimum_are_a_value_error_with_the_bound():
    with pytest.raises(ValueError, match=r"block must be an int >= 1, got block=0$"):
        check_int("block", 0)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0, got seed=-1$"):
        check_int("seed", np.int64(-1), minimum=0)


def test_flags_must_be_bools():
    assert check_bool("causal", np.bool_(True)) is True and check_bool("causal", False) is False
    for value in ("no", 1, None):
        with pytest.raises(TypeError, match=f"causal must be True or False, got {type(value).__name__}"):
            check_bool("causal", value)
