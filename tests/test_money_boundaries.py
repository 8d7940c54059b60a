"""Money crosses every boundary as integer micro-USDC; only `hf_escrow.money` scales by 10^6."""

from __future__ import annotations

import ast
import dataclasses
from decimal import Decimal
from pathlib import Path

import pytest

import hf_escrow
from hf_escrow import _models
from hf_escrow.money import to_usdc
from hf_escrow.pricing import STREAK_BONUS_PCT, earned_bonus, per_token_price, with_headroom_micro
from tests.helpers import buyer_and_seller

PACKAGE = Path(hf_escrow.__file__).resolve().parent
SCALE = 10 ** 6
SCALING_OPS = (ast.Mult, ast.Div, ast.FloorDiv)


def _is_scale(node: ast.AST) -> bool:
    """A literal 10^6 or 10^-6: ``1_000_000``, ``1e6``, ``1e-6``, ``10 ** 6``, ``Decimal("1e6")``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value in (SCALE, 1 / SCALE)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return ast.unparse(node).replace(" ", "") in ("10**6", "10**-6", "10**(-6)")
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("Decimal", "decimal.Decimal") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            try:
                return Decimal(arg.value) in (SCALE, Decimal(1) / SCALE)
            except ArithmeticError:
                return False
        return _is_scale(arg)
    return False


def scalings(source: str) -> list[str]:
    """Each multiplication or division by 10^6 in `source` (a literal, a name bound to one, or
    money's `MICRO_PER_USDC`), and each 10 ** 6 however used. A limit that happens to be a
    million (``MAX_OUTPUT_TOKENS = 1_000_000``) is only found if it scales something."""
    tree = ast.parse(source)
    names = {"MICRO_PER_USDC"} | {
        target.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
        and node.value is not None and _is_scale(node.value)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(target, ast.Name)}

    def named(operand: ast.AST) -> bool:
        return (isinstance(operand, ast.Name) and operand.id in names) \
            or (isinstance(operand, ast.Attribute) and operand.attr == "MICRO_PER_USDC")

    def scales(operands: tuple[ast.AST, ...]) -> bool:
        # A named million times a literal (``MAX_OUTPUT_TOKENS * 10``) is limit arithmetic.
        literal = any(isinstance(o, ast.Constant) for o in operands)
        return any(_is_scale(o) or (named(o) and not literal) for o in operands)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, SCALING_OPS):
            operands = (node.left, node.right)
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, SCALING_OPS):
            operands = (node.value,)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and _is_scale(node):
            operands = (node,)
        else:
            continue
        if scales(operands):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("snippet", [
    "x = amount * 1_000_000", "x = micro / 1e6", "x = 1000000 * amount", "x = amount * 1e-6",
    "x //= 1_000_000", "x = amount * 10 ** 6", "SCALE = 10**6", "x = d * Decimal('1e6')",
    "x = d * Decimal(1_000_000)", "x = d / Decimal('0.000001')",
    "MICRO = 1_000_000\nx = amount * MICRO", "from hf_escrow.money import MICRO_PER_USDC\nx = a / MICRO_PER_USDC",
    "x = a * money.MICRO_PER_USDC",
])
def test_the_scan_finds_every_spelling_of_a_usdc_scale(snippet):
    assert scalings(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "MAX_OUTPUT_TOKENS = 1_000_000", "MAX_TOKENS = 10_000_000", "ok = rows <= 1_000_000",
    "x = tokens * 1_000", "x = count / 1e3", "ns = seconds * 1_000_000_000",
    "MAX_OUTPUT_TOKENS = 1_000_000\nok = n <= MAX_OUTPUT_TOKENS", "LIMIT = 1_000_000\ncap = LIMIT * 10",
])
def test_the_scan_leaves_limits_and_other_units_alone(snippet):
    assert scalings(snippet) == [], snippet


def test_only_money_py_scales_usdc_by_ten_to_the_sixth():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "money.py":
            continue
        found = scalings(path.read_text(encoding="utf-8"))
        if found:
            offenders[path.relative_to(PACKAGE).as_posix()] = found
    assert offenders == {}, f"use hf_escrow.money (parse_usdc, to_usdc, round_micro) instead: {offenders}"
    assert scalings((PACKAGE / "money.py").read_text()), "the scan no longer sees money.py's own scale"


def test_the_dashboard_formats_micro_usdc_without_a_float_scale():
    import re
    scale = re.compile(r"(?<![\w.])(1e6|1e-6|1_?000_?000|10\s*\*\*\s*6)(?![\w.])")
    found = {path.name: scale.findall(path.read_text()) for path in PACKAGE.rglob("*.js")}
    assert found and not any(found.values()), found


# ---- the client models carry ints; their USDC attributes are views -----------------------

MODELS = [_models.Me, _models.Milestone, _models.Escrow, _models.BudgetedKey, _models.Hold, _models.Receipt]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_amount_of_a_model_is_an_int_field_with_a_decimal_view(model):
    names = {f.name: f.type for f in dataclasses.fields(model)}
    money = [name for name in names if name.endswith("_micro")]
    assert money and set(model._usdc_views) <= {name.removesuffix("_micro") for name in money}
    assert all(names[name] in ("int", "int | None", "dict[str, int]") for name in money), names
    assert not [name for name, kind in names.items() if "Decimal" in str(kind)], f"{model.__name__} stores Decimals"


def test_answers_carry_exact_ints_and_views_that_agree(tmp_path):
    buyer, seller = buyer_and_seller(f"sqlite:///{tmp_path / 'ledger.db'}")
    escrow = buyer.create_escrow("seller", "1.5")
    hold = seller.hold(escrow.spend_token, "0.05")
    receipt = seller.capture(hold.id, "0.0123", final=True)
    key = buyer.create_key(budget="1.00", sellers=["seller"], max_escrow="0.25")
    for value in (escrow, hold, receipt, receipt.escrow, receipt.hold, key, buyer.me()):
        for name in value._usdc_views:
            micro = getattr(value, f"{name}_micro")
            assert micro is None or type(micro) is int
            assert getattr(value, name) == (None if micro is None else to_usdc(micro)), (value, name)
            with pytest.raises(AttributeError):
                setattr(value, name, Decimal(0))       # a view, not a second copy of the amount
    assert (escrow.amount_micro, receipt.gross_micro, receipt.net_micro) == (1_500_000, 12_300, 12_177)
    assert (key.budget_micro, key.max_escrow_micro, key.left) == (1_000_000, 250_000, Decimal("1.000000"))
    shown = _models.as_dict(receipt)
    assert shown["gross_micro"] == 12_300 and shown["gross"] == "0.012300" and shown["escrow"]["remaining_micro"] == 1_487_700


# ---- pricing and bonuses in one place -----------------------------------------------

def test_headroom_covers_each_bonus_the_ledger_rounds_separately():
    for base in (1, 49, 50, 2_774, 1_000_001):
        bonus = earned_bonus(base, {"throughput_tps_min": 1, "bonus_pct": "5"}, throughput_tps=2,
                             quality_score=0.95, streak=True, quality_pct=Decimal(10), streak_pct=STREAK_BONUS_PCT)
        assert with_headroom_micro(base, [Decimal(5), Decimal(10), STREAK_BONUS_PCT]) == base + bonus.total_micro


def test_the_sizing_price_is_exact_and_refuses_zero_tokens():
    assert per_token_price(2_774, 1_387) * 1_387 == to_usdc(2_774)
    with pytest.raises(hf_escrow.ValidationError, match="price_per_token"):
        per_token_price(2_774, 0)
