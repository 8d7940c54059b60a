"""The buyer's side of a sale: paid inference, paid datasets, the meter, the vLLM
wrapper and AutoPay. It talks only to the escrow client and never imports the seller."""
