"""Milestone escrows: the seller submits a result per milestone, the verifier re-scores it, each
pass pays that milestone's share at once (fee and referral as for any payout).

Progress lives in the escrow's `result`, one entry per milestone (open, submitted, paid), and
changes only in a transaction that holds the escrow's row lock: whichever processes submit or
verify, the lock orders them and each one decides on the stored progress, so no milestone is
skipped or paid twice. A failed verdict leaves the milestone open until the TTL refunds the
unpaid shares; passing the last milestone closes the escrow and refunds any unallocated rest.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, update

from .._exceptions import StateConflict, ValidationError
from ..money import milestone_amounts
from . import rules
from .records import LedgerCorrupted, milestone_progress, receipt_dict, split_data
from .schema import escrows

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_number(milestone: Any) -> int | None:
    """A milestone number as the seller sends it: 1 for the first, or None for the next one due."""
    if milestone is None:
        return None
    if isinstance(milestone, bool) or not isinstance(milestone, int) or not 1 <= milestone <= rules.MAX_MILESTONES:
        raise ValidationError(f"milestone must be a milestone's number (1 for the first), got {milestone!r}")
    return milestone


class MilestoneOperations:
    """The milestone steps of `Ledger.submit_result` and `Ledger.verify` (inside their transactions)."""

    def _submit_milestone(self, conn: Connection, row: Any, agent_id: str, metric: str, score: float,
                          artifact: dict | None, number: int | None, now_ms: int) -> dict:
        plan = row.release_condition["milestones"]
        progress = milestone_progress(row.result, len(plan))
        due = next((i for i, state in enumerate(progress) if state["status"] != "paid"), None)
        if due is None:
            raise StateConflict(f"every milestone of escrow {row.escrow_id} has been paid")
        number = due + 1 if number is None else number
        if number > len(plan):
            raise ValidationError(f"escrow {row.escrow_id} has {len(plan)} milestones; there is no milestone {number}")
        if progress[number - 1]["status"] == "paid":
            raise StateConflict(f"milestone {number} of escrow {row.escrow_id} has already been paid")
        if number - 1 > due:
            raise StateConflict(f"milestone {number} cannot be submitted before milestone {due + 1} has passed "
                                f"verification; submit milestone {due + 1} first")
        milestone = plan[number - 1]
        if not self._reaches(row.release_condition, milestone, score):
            raise ValidationError(f"score {score} does not reach milestone {number} "
                                  f"({metric} {_sign(row.release_condition)} {milestone['threshold']}); "
                                  "submit once it does")
        sha256 = _artifact_sha256(artifact, number)
        progress[number - 1].update(status="submitted", sha256=sha256)
        result = {"metric": metric, "score": score, "artifact": artifact, "submitted_at_ms": now_ms,
                  "milestone": number, "milestones": progress}
        conn.execute(update(escrows).where(escrows.c.escrow_id == row.escrow_id)
                     .values(result=result, status="awaiting_verification"))
        self._event(conn, row.escrow_id, "milestone_submitted", agent_id, now_ms, milestone=number, metric=metric,
                    score=score, artifact=artifact)
        return receipt_dict("submit_result", self._escrow(conn, row.escrow_id), milestone=number, **split_data(None))

    def _judge_milestone(self, conn: Connection, row: Any, score: float, actor: str, now_ms: int, kind: str) -> dict:
        condition = row.release_condition
        plan = condition["milestones"]
        result = dict(row.result or {})
        number = result.get("milestone")
        progress = milestone_progress(result, len(plan))
        if not isinstance(number, int) or not 1 <= number <= len(plan) \
                or progress[number - 1]["status"] != "submitted":
            raise LedgerCorrupted(f"escrow {row.escrow_id} awaits verification without a submitted milestone: "
                                  f"{result}")
        milestone, state = plan[number - 1], progress[number - 1]
        if not self._reaches(condition, milestone, score):
            state.update(status="open", failures=state["failures"] + 1, verified_score=score)
            self._store_progress(conn, row.escrow_id, result, progress)
            self._event(conn, row.escrow_id, "milestone_failed", actor, now_ms, milestone=number, score=score,
                        threshold=milestone["threshold"])
            return receipt_dict(kind, self._escrow(conn, row.escrow_id), passed=False, score=score, milestone=number,
                                **split_data(None))
        remaining = self._remaining(conn, row.escrow_id)
        share_micro = milestone_amounts(int(row.amount_micro), [m["share_bps"] for m in plan])[number - 1]
        # Capped at what is left: the buyer may have paid part of the job by release already.
        amount = remaining if milestone["rest"] else min(share_micro, remaining)
        split = self._payout(conn, row, amount, 0, "release", now_ms)
        state.update(status="paid", paid_micro=amount, verified_score=score)
        self._store_progress(conn, row.escrow_id, result, progress)
        refunded = self._close(conn, row, "released", now_ms) if number == len(plan) else 0
        self._event(conn, row.escrow_id, "milestone_passed", actor, now_ms, milestone=number, score=score,
                    refunded_micro=refunded, **split_data(split))
        return receipt_dict(kind, self._escrow(conn, row.escrow_id), passed=True, score=score, milestone=number,
                            base_micro=amount, bonus_micro=0, refunded_micro=refunded, **split_data(split))

    @staticmethod
    def _reaches(condition: dict, milestone: dict, score: float) -> bool:
        return rules.benchmark_passes({"threshold": milestone["threshold"],
                                       "higher_is_better": condition["higher_is_better"]}, score)

    @staticmethod
    def _store_progress(conn: Connection, escrow_id: str, result: dict, progress: list[dict]) -> None:
        conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id)
                     .values(result={**result, "milestones": progress}, status="active"))


def _sign(condition: dict) -> str:
    return ">=" if condition["higher_is_better"] else "<="


def _artifact_sha256(artifact: dict | None, number: int) -> str:
    """A milestone is judged on one artifact: its repo (or folder) and the sha256 it must hash to."""
    artifact = artifact or {}
    sha256 = artifact.get("sha256")
    if not rules.is_key_text(artifact.get("repo"), 2_000) or not isinstance(sha256, str) \
            or not SHA256.fullmatch(sha256):
        raise ValidationError(f"milestone {number} needs its artifact: {{\"repo\": ..., \"revision\": ..., "
                              "\"sha256\": <64 lowercase hex digits>}, which the verifier re-scores")
    return sha256
