"""finetune_escrow.py - benchmark-triggered release (seed 003).

Kept: post_finetune_job as written, and the submit-result request at the end of
run_lora_finetune, factored out as-is into submit_finetune_result (it returns the
result, which the guide only prints). Left out: loading the hub model and dataset,
LoRA training and evaluation. Only ESCROW_URL's host comes from $ESCROW_BASE.
"""
import requests, os, json

PF_KEY     = os.environ["PF_API_KEY"]
ESCROW_URL = os.environ["ESCROW_BASE"] + "/api/escrow"

# ── BUYER SIDE: Create escrow job ─────────────────────
def post_finetune_job(
    base_model: str,
    dataset_id: str,
    target_metric: str,
    target_score: float,
    payment_usdc: float,
    seller_agent_id: str,
) -> dict:
    """Post a fine-tuning job with benchmark-gated escrow."""
    payload = {
        "seller_id":   seller_agent_id,
        "amount_usdc": payment_usdc,
        "ttl_seconds": 172800,   # 48h for fine-tuning
        "description": f"LoRA fine-tune: {base_model} on {dataset_id}",
        "release_condition": {
            "type": "benchmark",
            "metric": target_metric,
            "threshold": target_score,
            "higher_is_better": True,
        },
        "meta": {
            "base_model":    base_model,
            "dataset_id":    dataset_id,
            "target_metric": target_metric,
            "target_score":  target_score,
        }
    }
    r = requests.post(ESCROW_URL, json=payload,
                      headers={"Authorization": f"Bearer {PF_KEY}",
                               "Content-Type": "application/json"})
    r.raise_for_status()
    escrow = r.json()
    print(f"[job posted] escrow={escrow['id']} | locked=${payment_usdc} USDC")
    return escrow

# ── SELLER SIDE: Fine-tune and submit result ──────────
def submit_finetune_result(escrow_id: str, job_meta: dict, score: float):
    """The tail of run_lora_finetune: submit the evaluated score."""
    print(f"[eval] {job_meta['target_metric']}={score:.4f} | target={job_meta['target_score']}")

    # Submit result — escrow releases if score >= threshold
    r = requests.post(
        f"{ESCROW_URL}/{escrow_id}/submit-result",
        json={"metric": job_meta["target_metric"],
              "score":  score,
              "model_repo": "my-hf-username/my-finetuned-model"},
        headers={"Authorization": f"Bearer {PF_KEY}",
                 "Content-Type": "application/json"}
    )
    result = r.json()
    print(f"[escrow] status={result['status']} | payout={result.get('payout_usdc')}")
    return result
