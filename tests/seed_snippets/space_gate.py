"""app.py - Gradio Space with Purple Flea billing (seed 003).

Kept: the escrow gate as written. Left out: the `pipeline(...)` classifier (a hub model)
and the Gradio UI. Only ESCROW_URL's host comes from $ESCROW_BASE.
"""
import requests, os, time

PF_KEY     = os.environ["PF_API_KEY"]   # set in Space Secrets
ESCROW_URL = os.environ["ESCROW_BASE"] + "/api/escrow"
PRICE_PER_CALL = 0.001   # $0.001 USDC per classification

def verify_and_charge_escrow(escrow_id: str) -> bool:
    """Check that escrow is active and has sufficient balance."""
    r = requests.get(
        f"{ESCROW_URL}/{escrow_id}",
        headers={"Authorization": f"Bearer {PF_KEY}"}
    )
    if r.status_code != 200:
        return False
    escrow = r.json()
    if escrow["status"] != "active":
        return False
    if escrow["remaining_usdc"] < PRICE_PER_CALL:
        return False
    # Deduct per-call charge from escrow
    requests.post(
        f"{ESCROW_URL}/{escrow_id}/deduct",
        json={"amount_usdc": PRICE_PER_CALL,
              "reason": "sentiment classification"},
        headers={"Authorization": f"Bearer {PF_KEY}",
                 "Content-Type": "application/json"}
    )
    return True
