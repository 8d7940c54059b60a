"""Worker incentive model (seed 000, vLLM guide): the "Bonus fields on create" and the
"Score-gated release" JSON, sent the way escrow_client.py sends its bodies.

The guide shows them as fragments: create's `json={..., "bonus_conditions": {...}}` is
escrow_client.create_escrow's body plus bonus_conditions; the score-gated release body is
sent as written (release_score_gated) and, as release_escrow sends it, with the client's
price_per_token (release_with_quality). Tokens/s is sent as `throughput_tps` (the field
the release takes for the throughput bonus; the guide only says it is "measured").
"""
import httpx
import os

ESCROW_BASE = os.environ["ESCROW_BASE"]


async def create_escrow_with_bonus(escrow, worker_wallet: str, prompt_tokens: int,
                                   max_completion_tokens: int, model: str) -> dict:
    total_tokens = prompt_tokens + max_completion_tokens
    estimated_cost = total_tokens * escrow.price_per_token
    async with httpx.AsyncClient() as client:
        resp = await client.post(
            f"{ESCROW_BASE}/escrow/create",
            headers=escrow.headers,
            # Bonus fields on create
            json={
                "recipient_wallet": worker_wallet,
                "amount_usdc": estimated_cost,
                "metadata": {
                    "model": model,
                    "prompt_tokens": prompt_tokens,
                    "max_completion_tokens": max_completion_tokens,
                },
                "bonus_conditions": {
                    "throughput_tps_min": 100,
                    "bonus_pct": 5
                }
            },
        )
        resp.raise_for_status()
        return resp.json()


async def release_score_gated(escrow, record) -> httpx.Response:
    """The guide's score-gated release body, exactly as shown."""
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{ESCROW_BASE}/escrow/release",
            headers=escrow.headers,
            # Score-gated release
            json={
              "escrow_id": record.escrow_id,
              "quality_score": 0.94,  # 0–1
              "actual_completion_tokens": 387
            },
        )


async def release_with_quality(escrow, escrow_id: str, actual_completion_tokens: int,
                               quality_score: float, tokens_per_sec: float | None = None) -> dict:
    """release_escrow's body plus the quality score (and the measured tokens/s)."""
    body = {
        "escrow_id": escrow_id,
        "actual_completion_tokens": actual_completion_tokens,
        "price_per_token": escrow.price_per_token,
        "quality_score": quality_score,
    }
    if tokens_per_sec is not None:
        body["throughput_tps"] = tokens_per_sec
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{ESCROW_BASE}/escrow/release", headers=escrow.headers, json=body)
        resp.raise_for_status()
        return resp.json()
