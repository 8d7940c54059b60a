"""escrow_client.py (seed 000, vLLM guide), as written; ESCROW_BASE and API_KEY come
from $ESCROW_BASE and $PF_API_KEY."""
import httpx
import asyncio
import os
from dataclasses import dataclass
from typing import Optional

ESCROW_BASE = os.environ["ESCROW_BASE"]

# Replace with your actual Purple Flea API key
API_KEY = os.environ["PF_API_KEY"]

@dataclass
class EscrowRecord:
    escrow_id: str
    worker_wallet: str
    estimated_cost_usdc: float
    prompt_tokens: int
    max_completion_tokens: int
    model: str

class PurpleFleatEscrowClient:
    def __init__(self, api_key: str, price_per_token: float = 0.000002):
        self.api_key = api_key
        self.price_per_token = price_per_token  # USDC per token
        self.headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        }

    async def create_escrow(
        self,
        worker_wallet: str,
        prompt_tokens: int,
        max_completion_tokens: int,
        model: str,
    ) -> EscrowRecord:
        total_tokens = prompt_tokens + max_completion_tokens
        estimated_cost = total_tokens * self.price_per_token

        async with httpx.AsyncClient() as client:
            resp = await client.post(
                f"{ESCROW_BASE}/escrow/create",
                headers=self.headers,
                json={
                    "recipient_wallet": worker_wallet,
                    "amount_usdc": estimated_cost,
                    "metadata": {
                        "model": model,
                        "prompt_tokens": prompt_tokens,
                        "max_completion_tokens": max_completion_tokens,
                    },
                },
            )
            resp.raise_for_status()
            data = resp.json()

        return EscrowRecord(
            escrow_id=data["escrow_id"],
            worker_wallet=worker_wallet,
            estimated_cost_usdc=estimated_cost,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=max_completion_tokens,
            model=model,
        )

    async def release_escrow(
        self,
        escrow_id: str,
        actual_completion_tokens: int,
    ) -> dict:
        # Calculates refund automatically if actual < estimated
        async with httpx.AsyncClient() as client:
            resp = await client.post(
                f"{ESCROW_BASE}/escrow/release",
                headers=self.headers,
                json={
                    "escrow_id": escrow_id,
                    "actual_completion_tokens": actual_completion_tokens,
                    "price_per_token": self.price_per_token,
                },
            )
            resp.raise_for_status()
            return resp.json()

    async def cancel_escrow(self, escrow_id: str) -> dict:
        # Called on error — refunds full amount to orchestrator
        async with httpx.AsyncClient() as client:
            resp = await client.post(
                f"{ESCROW_BASE}/escrow/cancel",
                headers=self.headers,
                json={"escrow_id": escrow_id},
            )
            resp.raise_for_status()
            return resp.json()
