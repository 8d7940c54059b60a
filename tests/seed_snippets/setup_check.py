"""setup.sh (seed 003): "Verify Purple Flea API key works". The curl line as written,
host from $ESCROW_BASE, key from $PF_API_KEY (the shell expands both)."""

VERIFY_KEY = '''curl -s -H "Authorization: Bearer $PF_API_KEY" \\
  $ESCROW_BASE/api/me | python3 -m json.tool'''

# Expected response (keys):
# {
#   "agent_id": "agent_xxxx",
#   "balance_usdc": 10.50,
#   "referral_code": "pf_ref_xxxx",
#   "escrows_open": 0
# }
EXPECTED_KEYS = ("agent_id", "balance_usdc", "referral_code", "escrows_open")
