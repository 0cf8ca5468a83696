"""cli_types: every range accepts its bounds, refuses the values just outside, and a refusal through argparse is a
usage error (exit 2) naming the flag and the value."""
import argparse

import pytest

from infra import cli_types as ct


@pytest.mark.parametrize("parse, good, bad", [
    (ct.positive_int, ["1", "7", "+3", " 12 "], ["0", "-1", "1.5", "one", "", "1e3"]),
    (ct.non_negative_int, ["0", "5"], ["-1", "nan"]),
    (ct.seed, ["0", str(2 ** 32 - 1)], ["-1", str(2 ** 32)]),
    (ct.positive_float, ["1e-9", "3", "0.5"], ["0", "-0.0", "-1e-9", "inf", "nan", "x"]),
    (ct.non_negative_float, ["0", "2.5"], ["-1e-300", "inf", "-inf", "nan"]),
    (ct.finite_float, ["-3.5", "0", "1e300"], ["inf", "nan", "1e999"]),
    (ct.int_range(-1, 3), ["-1", "0", "3"], ["-2", "4"]),
    (ct.float_range(0.0, 1.0), ["0", "1", "0.25"], ["-0.1", "1.01"]),
    (ct.beta, ["0", "0.999", "0.9"], ["1", "1.0", "-0.1", "nan"]),
    (ct.integer, ["-5", "0", "7"], ["1.5", "x", ""]),
])
def test_ranges_accept_their_bounds_and_refuse_what_lies_outside(parse, good, bad):
    for text in good:
        assert parse(text) == float(text.strip())
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("+", r"\+")):
            parse(text)


def test_ints_come_back_as_ints():
    assert type(ct.positive_int("4")) is int and type(ct.seed("0")) is int


def test_a_refused_value_is_a_usage_error_naming_flag_and_value(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--topk", type=ct.positive_int, default=100)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--topk", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --topk: must be an integer >= 1 (got '0')" in err
    assert "Traceback" not in err
    assert parser.parse_args([]).topk == 100  # defaults are not parsed by the type
