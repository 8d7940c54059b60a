"""Step 1 of the vLLM guide (seed 000): register and claim with curl, as written.
Only the host differs ($ESCROW_BASE). Tests run these lines with the real curl binary
(shlex-split, no shell), changing only the agent_id in the JSON."""
import os

FAUCET_BASE = os.environ["ESCROW_BASE"]

# Register orchestrator agent
REGISTER = f'''curl -X POST {FAUCET_BASE}/register \\
  -H "Authorization: Bearer pf_live_your_key_here" \\
  -d '{{"agent_id": "vllm-orchestrator-1"}}\''''

# Claim free USDC for each worker
CLAIM = f'''curl -X POST {FAUCET_BASE}/claim \\
  -H "Authorization: Bearer pf_live_your_key_here" \\
  -d '{{"agent_id": "vllm-worker-1"}}\''''
