"""Exact money: parsing USDC into micro-USDC, the fee/referral split, and price sheets."""

from __future__ import annotations

from decimal import Decimal
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_escrow import InvalidAmount, Pricing, ValidationError
from hf_escrow.money import (
    MAX_AMOUNT_MICRO, format_usdc, parse_usdc, split_over_life, split_payout, to_usdc, was_rounded,
)


def half_even(numerator: int, denominator: int) -> int:
    """numerator/denominator rounded to the nearest integer, ties to even (integers only)."""
    assert numerator >= 0 and denominator > 0
    quotient, rest = divmod(numerator, denominator)
    if 2 * rest > denominator or (2 * rest == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


# ---- parse_usdc: what is accepted ------------------------------------------------------

@pytest.mark.parametrize("value, micro", [
    ("1.50", 1_500_000),
    ("  2.25  ", 2_250_000),
    ("0.000001", 1),
    ("1", 1_000_000),
    ("1e-6", 1),
    ("100000000", MAX_AMOUNT_MICRO),
    (1, 1_000_000),
    (7, 7_000_000),
    (Decimal("0.25"), 250_000),
    (Decimal("1.000000"), 1_000_000),
    (0.25, 250_000),
    (0.1, 100_000),
    (1.5, 1_500_000),
    (0.000001, 1),
    (0.0017920000000000002, 1_792),
    (2048 / 1000 * 0.0005 + 512 / 1000 * 0.0015, 1_792),  # the seed's float product, unchanged
    (1024 / 1000 * 0.0005 + 256 / 1000 * 0.0015, 896),
])
def test_parse_usdc_accepts_strings_ints_decimals_and_floats(value, micro):
    assert parse_usdc(value) == micro


def test_seed_float_product_is_not_binary_arithmetic():
    # The float product, whatever tail its binary arithmetic leaves, is read as the number written.
    product = 2048 / 1000 * 0.0005 + 512 / 1000 * 0.0015
    assert parse_usdc(product) == 1_792
    assert parse_usdc(repr(product)) == 1_792


@pytest.mark.parametrize("value", ["0.0000185", Decimal("0.0000185"), 37 / 1000 * 0.0005, 1.85e-05])
def test_sub_micro_cost_of_37_tokens_rounds_half_even_to_18(value):
    # 37 tokens at 0.0005 USDC per 1k = 0.0000185 USDC = 18.5 micro-USDC -> 18 (ties to even)
    assert parse_usdc(value) == 18
    assert was_rounded(value)


@pytest.mark.parametrize("value, micro", [
    ("0.0000015", 2),    # 1.5 -> 2 (tie, up to even)
    ("0.0000025", 2),    # 2.5 -> 2 (tie, down to even)
    ("0.0000035", 4),
    ("0.0000045", 4),
    ("0.00000149", 1),
    ("0.00000151", 2),
    ("0.0000005000001", 1),
    ("1.0000005", 1_000_000),
    ("1.0000015", 1_000_002),
    (Decimal("0.0000025"), 2),
    (0.0000015, 2),
    (0.0000025, 2),
])
def test_more_than_six_decimals_round_half_even(value, micro):
    assert parse_usdc(value) == micro
    assert was_rounded(value)


@pytest.mark.parametrize("value", ["1.5", "0.000001", 3, Decimal("2.000000")])
def test_six_decimals_or_fewer_are_not_rounded(value):
    assert not was_rounded(value)


@pytest.mark.parametrize("value", ["0.0000005", Decimal("0.0000005"), 0.0000005, "0.0000004", "0", 0, 0.0,
                                   Decimal("0"), "-0", "1e-400", 5e-324])
def test_amount_that_rounds_to_zero_is_refused(value):
    with pytest.raises(InvalidAmount) as info:
        parse_usdc(value)
    assert str(info.value)
    assert "0" in str(info.value)


@pytest.mark.parametrize("value", ["0", "0.0000005", 0])
def test_zero_is_accepted_where_allowed(value):
    assert parse_usdc(value, allow_zero=True) == 0


@pytest.mark.parametrize("value", [
    "-1", "-0.000001", -1, -0.5, Decimal("-0.01"),
    float("nan"), float("inf"), float("-inf"), "NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf",
    Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"),
    "1e400", "1E+16", 10 ** 30, 1e300, Decimal("1e20"), "9" * 60,
    "100000000.000001", MAX_AMOUNT_MICRO // 1_000_000 + 1, 1.0e9,
    True, False, None, [], [1], {}, {"amount": 1}, (1,), b"1", object(), 1 + 2j,
    "abc", "", "   ", "1.2.3", "1,5", "$1", "0x10", "1 000", "x" * 500,
])
def test_refusals_raise_invalid_amount_with_a_message(value):
    with pytest.raises(InvalidAmount) as info:
        parse_usdc(value)
    message = str(info.value)
    assert len(message) > 10
    assert "amount" in message
    assert info.value.status_code == 422
    assert isinstance(info.value, ValidationError)


def test_refusal_message_names_the_field():
    with pytest.raises(InvalidAmount, match="price"):
        parse_usdc("-1", what="price")


def test_largest_amount_is_accepted_one_more_micro_is_not():
    assert parse_usdc(format_usdc(MAX_AMOUNT_MICRO)) == MAX_AMOUNT_MICRO
    assert parse_usdc(float(to_usdc(MAX_AMOUNT_MICRO))) == MAX_AMOUNT_MICRO
    with pytest.raises(InvalidAmount, match="limit"):
        parse_usdc(format_usdc(MAX_AMOUNT_MICRO + 1))


@given(st.integers(min_value=1, max_value=MAX_AMOUNT_MICRO))
@settings(max_examples=300, deadline=None)
def test_every_micro_amount_round_trips_through_text_decimal_and_float(micro):
    text = format_usdc(micro)
    assert parse_usdc(text) == micro
    assert parse_usdc(to_usdc(micro)) == micro
    assert parse_usdc(float(text)) == micro  # 15 significant digits at most: a float keeps them
    assert Fraction(to_usdc(micro)) == Fraction(micro, 1_000_000)


@given(st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(10_000), places=9, allow_nan=False))
@settings(max_examples=300, deadline=None)
def test_parse_matches_an_independent_half_even(value):
    exact = Fraction(value) * 1_000_000
    expected = half_even(exact.numerator, exact.denominator)
    if expected == 0:
        with pytest.raises(InvalidAmount):
            parse_usdc(value)
    else:
        assert parse_usdc(value) == expected
        assert parse_usdc(str(value)) == expected


# ---- split_payout ----------------------------------------------------------------------

def _check_split(gross: int, fee_bps: int, referral_bps: int, has_referrer: bool) -> None:
    split = split_payout(gross, fee_bps=fee_bps, referral_bps=referral_bps, has_referrer=has_referrer)
    assert split.gross_micro == gross
    assert split.net_micro + split.fee_micro == gross
    assert split.referral_micro + split.platform_micro == split.fee_micro
    assert min(split.net_micro, split.fee_micro, split.referral_micro, split.platform_micro) >= 0
    assert split.fee_micro == half_even(gross * fee_bps, 10_000)
    expected_referral = half_even(split.fee_micro * referral_bps, 10_000) if has_referrer else 0
    assert split.referral_micro == expected_referral


def test_split_payout_for_every_gross_from_1_to_20000_micro():
    for gross in range(1, 20_001):
        _check_split(gross, 100, 1_500, True)
        _check_split(gross, 100, 1_500, False)


def test_split_payout_known_values():
    split = split_payout(1_500_000, fee_bps=100, referral_bps=1_500, has_referrer=True)
    assert (split.net_micro, split.fee_micro, split.referral_micro, split.platform_micro) == \
        (1_485_000, 15_000, 2_250, 12_750)
    one = split_payout(1, fee_bps=100, referral_bps=1_500, has_referrer=True)
    assert (one.net_micro, one.fee_micro, one.referral_micro, one.platform_micro) == (1, 0, 0, 0)
    # 150 micro at 1% = 1.5 -> 2 (tie to even); 250 micro at 1% = 2.5 -> 2
    assert split_payout(150, fee_bps=100, referral_bps=1_500, has_referrer=False).fee_micro == 2
    assert split_payout(250, fee_bps=100, referral_bps=1_500, has_referrer=False).fee_micro == 2
    assert split_payout(350, fee_bps=100, referral_bps=1_500, has_referrer=False).fee_micro == 4
    everything = split_payout(999, fee_bps=10_000, referral_bps=10_000, has_referrer=True)
    assert (everything.net_micro, everything.fee_micro, everything.referral_micro) == (0, 999, 999)
    nothing = split_payout(999, fee_bps=0, referral_bps=1_500, has_referrer=True)
    assert (nothing.net_micro, nothing.fee_micro, nothing.referral_micro) == (999, 0, 0)


def test_split_payout_of_zero_is_all_zero():
    split = split_payout(0, fee_bps=100, referral_bps=1_500, has_referrer=True)
    assert (split.net_micro, split.fee_micro, split.referral_micro, split.platform_micro) == (0, 0, 0, 0)


@given(gross=st.one_of(st.integers(1, 20_000), st.integers(1, MAX_AMOUNT_MICRO)),
       fee_bps=st.one_of(st.just(100), st.integers(0, 10_000)),
       referral_bps=st.one_of(st.just(1_500), st.integers(0, 10_000)),
       has_referrer=st.booleans())
@settings(max_examples=1_000, deadline=None)
def test_split_payout_property(gross, fee_bps, referral_bps, has_referrer):
    _check_split(gross, fee_bps, referral_bps, has_referrer)


# ---- pricing ---------------------------------------------------------------------------

def test_per_1k_prices_the_seed_call_at_1792_micro():
    sheet = Pricing(input_per_1k="0.0005", output_per_1k="0.0015")
    assert sheet.tokens_micro(prompt_tokens=2048, completion_tokens=512) == 1_792
    assert sheet.tokens_micro(0, 0) == 0
    assert sheet.sells_tokens


def test_37_tokens_at_0_0005_per_1k_round_once_to_18_micro():
    assert Pricing(input_per_1k="0.0005").tokens_micro(37, 0) == 18
    assert Pricing(output_per_1k=0.0005).tokens_micro(0, 37) == 18


def test_a_call_is_rounded_once_on_its_total():
    # 1 + 1 tokens at 0.0005/1k: 0.5 + 0.5 micro = 1 micro (rounding each part would give 0 + 0)
    sheet = Pricing(input_per_1k="0.0005", output_per_1k="0.0005")
    assert sheet.tokens_micro(1, 1) == 1
    assert sheet.tokens_micro(1, 0) == 0  # 0.5 -> 0 (tie to even)
    assert sheet.tokens_micro(3, 0) == 2  # 1.5 -> 2


@given(prompt=st.integers(0, 10_000_000), completion=st.integers(0, 10_000_000),
       input_price=st.decimals(min_value=0, max_value=100, places=6, allow_nan=False),
       output_price=st.decimals(min_value=0, max_value=100, places=6, allow_nan=False))
@settings(max_examples=300, deadline=None)
def test_per_1m_is_per_1k_times_1000(prompt, completion, input_price, output_price):
    per_1m = Pricing(input_per_1m=input_price, output_per_1m=output_price)
    per_1k = Pricing(input_per_1k=input_price / 1000, output_per_1k=output_price / 1000)
    assert per_1m.input_per_1k == input_price / 1000
    cost = per_1m.tokens_micro(prompt, completion)
    assert cost == per_1k.tokens_micro(prompt, completion)
    exact = Fraction(prompt) * Fraction(input_price) + Fraction(completion) * Fraction(output_price)
    assert cost == half_even(exact.numerator, exact.denominator)


def test_per_1m_and_per_1k_of_the_same_price_agree():
    assert Pricing(input_per_1m="0.5", output_per_1m="1.5").tokens_micro(2048, 512) == 1_792
    assert Pricing(input_per_1m="0.5", output_per_1m="1.5") == Pricing(input_per_1k="0.0005", output_per_1k="0.0015")


def test_per_token_price():
    sheet = Pricing(per_token="0.00001")
    assert sheet.tokens_micro(100, 50) == 1_500
    assert Pricing(per_token=0.0000001).tokens_micro(5, 0) == 0      # 0.5 micro -> 0
    assert Pricing(per_token=0.0000001).tokens_micro(15, 0) == 2     # 1.5 micro -> 2
    assert Pricing.coerce({"price_per_token": "0.00001"}) == sheet


def test_unit_prices():
    sheet = Pricing(per_call="0.01", per_image="0.02", per_vector="0.0000001", per_shard="0.5")
    assert sheet.unit_micro("per_call") == 10_000
    assert sheet.unit_micro("per_image", 3) == 60_000
    assert sheet.unit_micro("per_vector", 15) == 2
    assert sheet.unit_micro("per_shard", 2) == 1_000_000
    assert not sheet.sells_tokens
    with pytest.raises(ValidationError, match="token prices"):
        sheet.tokens_micro(1, 1)


def test_a_unit_not_sold_is_refused():
    sheet = Pricing(per_call="0.01")
    with pytest.raises(ValidationError, match="per_image"):
        sheet.unit_micro("per_image")
    with pytest.raises(ValidationError, match="unknown unit"):
        sheet.unit_micro("per_banana")
    with pytest.raises(ValidationError):
        Pricing(input_per_1k="0.001").unit_micro("per_call")


def test_pricing_from_dict_and_back():
    data = {"input_per_1k": "0.0005", "output_per_1k": 0.0015, "per_call": 1}
    sheet = Pricing.coerce(data)
    assert sheet.input_per_1k == Decimal("0.0005") and sheet.output_per_1k == Decimal("0.0015")
    assert sheet.to_dict() == {"input_per_1k": "0.0005", "output_per_1k": "0.0015", "per_call": "1"}
    assert Pricing.coerce(sheet.to_dict()) == sheet
    assert Pricing.coerce(sheet) is sheet
    assert Pricing.coerce(None) is None
    assert Pricing.coerce({"input_per_1m": "0.5"}).input_per_1k == Decimal("0.0005")


def test_pricing_from_toml_file(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('input_per_1k = "0.0005"\noutput_per_1k = "0.0015"\n')
    table = tmp_path / "table.toml"
    table.write_text('[pricing]\ninput_per_1m = "0.5"\noutput_per_1m = 1.5\nper_call = "0.01"\n')
    assert Pricing.from_toml(flat).tokens_micro(2048, 512) == 1_792
    from_table = Pricing.coerce(str(table))
    assert from_table.tokens_micro(2048, 512) == 1_792
    assert from_table.unit_micro("per_call") == 10_000
    assert Pricing.coerce(table) == from_table

    unknown = tmp_path / "unknown.toml"
    unknown.write_text('input_per_1k = "0.0005"\nper_banana = "1"\n')
    with pytest.raises(ValidationError, match="per_banana"):
        Pricing.from_toml(unknown)
    broken = tmp_path / "broken.toml"
    broken.write_text("input_per_1k = = 1\n")
    with pytest.raises(ValidationError, match="cannot read"):
        Pricing.from_toml(broken)
    with pytest.raises(ValidationError, match="cannot read"):
        Pricing.from_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize("data", [
    {"input_per_1k": "0.0005", "colour": "blue"},
    {"input_per_1000": "0.0005"},
    {"per_token": "0.1", "per_minute": "1"},
])
def test_unknown_pricing_keys_are_refused(data):
    with pytest.raises(ValidationError, match="unknown pricing keys"):
        Pricing.coerce(data)


@pytest.mark.parametrize("kwargs, error", [
    ({}, ValidationError),
    ({"input_per_1k": "0.0005", "input_per_1m": "0.5"}, ValidationError),
    ({"output_per_1k": "0.0015", "output_per_1m": "1.5"}, ValidationError),
    ({"input_per_1k": "-0.0005"}, InvalidAmount),
    ({"per_call": "abc"}, InvalidAmount),
    ({"per_call": float("nan")}, InvalidAmount),
    ({"per_call": True}, InvalidAmount),
    ({"per_token": "1e400"}, InvalidAmount),
    ({"input_per_1m": "-1"}, InvalidAmount),
])
def test_bad_price_sheets_are_refused(kwargs, error):
    with pytest.raises(error):
        Pricing(**kwargs)


@pytest.mark.parametrize("value", [["input_per_1k"], 42, 1.5])
def test_pricing_of_the_wrong_type_is_refused(value):
    with pytest.raises(ValidationError):
        Pricing.coerce(value)


@pytest.mark.parametrize("counts", [(-1, 0), (0, -1), (True, 0), (1.5, 0), ("10", 0), (10_000_001, 0), (None, 0)])
def test_bad_token_counts_are_refused(counts):
    with pytest.raises(ValidationError):
        Pricing(input_per_1k="0.0005").tokens_micro(*counts)


# ---- fees over an escrow's life ---------------------------------------------------------

@given(grosses=st.lists(st.integers(1, 5_000_000), min_size=1, max_size=60),
       fee_bps=st.integers(0, 10_000), referral_bps=st.integers(0, 10_000), has_referrer=st.booleans())
def test_fees_over_a_life_equal_the_fee_of_the_sum(grosses, fee_bps, referral_bps, has_referrer):
    """However a payment is split, its fees and referral are those of one payout of the sum."""
    paid = fees = referral = 0
    for gross in grosses:
        split = split_over_life(gross, paid_before_micro=paid, fees_before_micro=fees,
                                referral_before_micro=referral, fee_bps=fee_bps, referral_bps=referral_bps,
                                has_referrer=has_referrer)
        assert split.net_micro + split.fee_micro == gross and split.referral_micro + split.platform_micro == split.fee_micro
        assert min(split.net_micro, split.fee_micro, split.referral_micro, split.platform_micro) >= 0
        paid, fees, referral = paid + gross, fees + split.fee_micro, referral + split.referral_micro
    whole = split_payout(paid, fee_bps=fee_bps, referral_bps=referral_bps, has_referrer=has_referrer)
    assert (fees, referral) == (whole.fee_micro, whole.referral_micro)


def test_two_hundred_payouts_of_fifty_micro_pay_the_fee():
    fees = 0
    for i in range(200):
        fees += split_over_life(50, paid_before_micro=50 * i, fees_before_micro=fees, referral_before_micro=0,
                                fee_bps=100, referral_bps=1_500, has_referrer=False).fee_micro
    assert fees == 100   # per payout, 1% of 50 micro rounds to 0: the old split paid no fee at all


@pytest.mark.parametrize("text", ["1_000", "1_0.5", "١٢", "１", "٣.٥", "NaN", "nan", "sNaN", "Infinity", " 1 2 "])
def test_amount_text_is_ascii_digits_only(text):
    with pytest.raises(InvalidAmount):
        parse_usdc(text)


def test_money_invariants_hold_under_python_O():
    """`python -O` strips asserts; the checks on money must still raise there."""
    script = (
        "from hf_escrow.money import MoneyInvariantBroken, share, to_usdc\n"
        "for bad in (lambda: to_usdc(1.5), lambda: share(-1, 100)):\n"
        "    try:\n"
        "        bad()\n"
        "    except MoneyInvariantBroken:\n"
        "        continue\n"
        "    raise SystemExit('an invariant did not raise under -O')\n"
        "print('checked')\n"
    )
    done = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "checked"), done.stderr


def test_money_examples_in_docstrings_run():
    import doctest

    import hf_escrow.money

    outcome = doctest.testmod(hf_escrow.money)
    assert outcome.attempted > 0 and outcome.failed == 0, outcome
