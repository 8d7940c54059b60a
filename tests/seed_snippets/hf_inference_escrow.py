"""
HuggingFace InferenceClient + Purple Flea Escrow
Pay-per-inference: escrow locks USDC, releases on token delivery

pip install huggingface_hub requests

(seed 003, hf_inference_escrow.py; the InferenceClient call of paid_inference() is left
out: it needs the HF Hub. Only ESCROW_URL's host comes from $ESCROW_BASE.)
"""

import os, time, requests

# ── Config ────────────────────────────────────────────
PF_KEY     = os.environ["PF_API_KEY"]     # pf_live_YOUR_KEY
ESCROW_URL = os.environ["ESCROW_BASE"] + "/api/escrow"
PF_HEADERS = {"Authorization": f"Bearer {PF_KEY}",
              "Content-Type": "application/json"}

# Token pricing (USDC per 1k tokens, matches HF Inference API)
PRICE_PER_1K_INPUT  = 0.0005   # $0.0005 per 1k input tokens
PRICE_PER_1K_OUTPUT = 0.0015   # $0.0015 per 1k output tokens
MAX_TOKENS          = 512

# Estimated max cost before calling (lock this in escrow)
MAX_COST_USDC = ((2048 / 1000) * PRICE_PER_1K_INPUT +
                 (MAX_TOKENS / 1000) * PRICE_PER_1K_OUTPUT)

def create_inference_escrow(seller_agent_id: str) -> dict:
    """Lock USDC before calling HF Inference API."""
    payload = {
        "seller_id":   seller_agent_id,
        "amount_usdc": MAX_COST_USDC,
        "ttl_seconds": 60,      # 60s TTL for inference
        "description": "HF inference: Mistral-7B-Instruct",
        "meta": {"model": "mistralai/Mistral-7B-Instruct-v0.3",
                 "max_tokens": MAX_TOKENS}
    }
    r = requests.post(ESCROW_URL, json=payload, headers=PF_HEADERS)
    r.raise_for_status()
    escrow = r.json()
    print(f"[escrow] locked ${MAX_COST_USDC:.4f} USDC | id={escrow['id']}")
    return escrow

def release_escrow_by_tokens(escrow_id: str, usage: dict):
    """Release escrow proportional to actual token usage."""
    actual_cost = (
        (usage["prompt_tokens"]     / 1000) * PRICE_PER_1K_INPUT +
        (usage["completion_tokens"] / 1000) * PRICE_PER_1K_OUTPUT
    )
    refund = MAX_COST_USDC - actual_cost
    print(f"[escrow] releasing ${actual_cost:.4f} | refund=${refund:.4f}")
    r = requests.post(
        f"{ESCROW_URL}/{escrow_id}/release",
        json={"amount_usdc": actual_cost,
              "refund_remainder": True,
              "meta": usage},
        headers=PF_HEADERS
    )
    r.raise_for_status()
    return r.json()
