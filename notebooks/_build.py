"""Writes the quickstart notebooks from the cells below (run: python notebooks/_build.py).

Kept as code so that a notebook's diff is readable; the .ipynb files are committed too,
for people who open them directly.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

NOTEBOOKS = {
    "01_paid_inference.ipynb": [
        new_markdown_cell("# Paid inference\n\nA buyer locks USDC in an escrow; every chat call is billed per "
                          "token (the server's `usage`) and the rest is refunded at the end. Everything runs "
                          "locally: an embedded SQLite ledger and gemma-3-270m served by `transformers serve`."),
        new_code_cell("import os, tempfile\n"
                      "os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run\n"
                      "import hf_escrow\n"
                      "from hf_escrow.localmodel import prepare_model, served_model\n\n"
                      "buyer, seller = hf_escrow.connect(agent='nb-buyer'), hf_escrow.connect(agent='nb-seller')\n"
                      "buyer.register(); seller.register()\n"
                      "print('faucet:', buyer.claim_faucet(), 'USDC')"),
        new_markdown_cell("Start the local model (converted once from the packaged GGUF, then cached)."),
        new_code_cell("model_dir = prepare_model(home=os.environ.get('HF_ESCROW_TEST_MODEL_HOME'))\n"
                      "server = served_model(model_dir)\n"
                      "base_url = server.__enter__()\n"
                      "base_url"),
        new_markdown_cell("Open an escrow of 0.05 USDC and chat; each call reserves its worst case first."),
        new_code_cell("pricing = {'input_per_1k': '0.0005', 'output_per_1k': '0.0015'}\n"
                      "with hf_escrow.paid_inference(base_url, escrow=buyer, seller='nb-seller', budget='0.05',\n"
                      "                              pricing=pricing, tokenizer=str(model_dir)) as client:\n"
                      "    out = client.chat_completion([{'role': 'user', 'content': 'Hello!'}], max_tokens=16)\n"
                      "    text = ''.join(c.choices[0].delta.content or '' for c in\n"
                      "                   client.chat_completion([{'role': 'user', 'content': 'Count to 3'}],\n"
                      "                                          max_tokens=16, stream=True) if c.choices)\n"
                      "    receipts, escrow_id = client.receipts, client.escrow_id\n"
                      "for r in receipts:\n"
                      "    print(r.task, r.tokens_in, r.tokens_out, r.gross, r.counted_by)"),
        new_code_cell("escrow = buyer.get(escrow_id)\n"
                      "assert escrow.status == 'released' and escrow.paid == sum(r.gross for r in receipts)\n"
                      "assert escrow.amount == escrow.paid + escrow.refunded\n"
                      "print(escrow.status, 'paid', escrow.paid, 'refunded', escrow.refunded)\n"
                      "print('seller balance', seller.me().balance)"),
        new_code_cell("server.__exit__(None, None, None)"),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}})
        nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    main()
