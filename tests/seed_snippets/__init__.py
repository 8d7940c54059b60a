"""The HTTP snippets of the two seed guides, near-verbatim.

Only two things differ from the guides: the base URL comes from `$ESCROW_BASE` (the
live test server instead of escrow.purpleflea.com / faucet.purpleflea.com) and the key
from `$PF_API_KEY`. The parts that call the Hugging Face Hub or vLLM (InferenceClient,
`pipeline(...)`, Trainer, AsyncLLMEngine) are left out; the escrow code is kept as
written: `requests`/`httpx`, float math, field names.

Modules read the environment at import, like the guides' scripts: tests load one
module instance per agent (see tests/test_seed_snippets.py::load_snippet).

    hf_inference_escrow.py   003 guide, "hf_inference_escrow.py"
    space_gate.py            003 guide, "app.py - Gradio Space with Purple Flea billing"
    finetune_escrow.py       003 guide, "finetune_escrow.py - benchmark-triggered release"
    setup_check.py           003 guide, "setup.sh" (the /api/me curl line)
    escrow_client.py         000 guide, "escrow_client.py"
    worker_bonus.py          000 guide, bonus fields on create, score-gated release
    faucet_curl.py           000 guide, step 1 (the faucet curl lines)
"""
