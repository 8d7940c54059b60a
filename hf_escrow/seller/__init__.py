"""The seller's side of a sale: the faces that take payment (the OpenAI-compatible
gateway, the Gradio gate, the shard server) and the till they share."""
