"""The one rule for numbers in reports, model cards and summaries (stage1core.text)."""

import math

from stage1core.text import num, signed


def test_num_writes_four_decimals_and_n_a_for_what_is_not_a_number():
    assert num(0.25) == "0.2500" and num(-1.0) == "-1.0000"
    assert num(None) == num(math.nan) == num(math.inf) == "n/a"
    assert num(3) == "3" and num(True) == "True" and num("linear/all") == "linear/all"


def test_signed_always_shows_the_sign():
    assert signed(0.01) == "+0.0100" and signed(-0.5) == "-0.5000" and signed(0.0) == "+0.0000"
    assert signed(None) == signed(math.nan) == signed(3) == "n/a"
