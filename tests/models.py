"""Tiny local models and servers for the fast tests, built from a config in a temp dir."""


import hashlib
import io
from pathlib import Path

CORPUS = [
    "hello world", "the escrow pays the seller", "tokens are billed per thousand", "refund the remainder",
    "a buyer locks usdc before work starts", "gradio spaces and datasets shards", "say hi in french",
] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_tiny_chat_model(folder: Path) -> Path:
    """A random 1-layer Llama with a small BPE tokenizer and a chat template, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import torch

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config)
    # Never end early: the tests count exactly max_tokens when no stop token can be drawn.
    model.generation_config.eos_token_id = None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def unit_app(encoder_dir: str):
    """A local inference endpoint: real MiniLM embeddings at /embed (and OpenAI's /v1/embeddings, as TEI
    and vLLM serve them), a PNG per prompt at /image.

    Also counts the requests it gets, so tests can prove a refused call never reached it.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer
    import torch

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    encoder = AutoModel.from_pretrained(encoder_dir, local_files_only=True).eval()
    app = FastAPI()
    app.state.requests = 0

    def encode(texts):
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1), int(batch["attention_mask"].sum())

    @app.post("/embed")
    async def embed(request: Request):
        app.state.requests += 1
        body = await request.json()
        texts = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
        return JSONResponse(encode(texts)[0].tolist())

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        app.state.requests += 1
        body = await request.json()
        given = body["input"]
        if isinstance(given, list) and given and not isinstance(given[0], str):   # token ids: decode them
            batches = given if isinstance(given[0], list) else [given]
            given = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batches]
        texts = given if isinstance(given, list) else [given]
        vectors, tokens = encode(texts)
        if body.get("encoding_format") == "base64":
            import base64
            shown = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            shown = vectors.tolist()
        return JSONResponse({"object": "list", "model": body.get("model", "minilm"),
                             "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(shown)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/image")
    async def image(request: Request):
        app.state.requests += 1
        body = await request.json()
        seed = hashlib.sha256(body["inputs"].encode()).digest()
        picture = Image.new("RGB", (16, 16), tuple(seed[:3]))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.post("/broken")
    async def broken(request: Request):
        app.state.requests += 1
        return JSONResponse({"error": "model crashed"}, status_code=500)

    return app


def tgi_app(model_dir):
    """Text Generation Inference's `/generate` API (POST / with details and SSE streams) over a real local
    model, greedy, so a prompt always gives the same tokens: the server huggingface_hub's
    `text_generation` speaks to."""
    import json

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    app = FastAPI()

    def generate(prompt: str, max_new_tokens: int) -> list[dict]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
        return [{"id": int(t), "text": tokenizer.decode([int(t)]), "logprob": 0.0, "special": False} for t in out]

    @app.post("/")
    async def text_generation(request: Request):
        body = await request.json()
        tokens = generate(body["inputs"], int(body["parameters"]["max_new_tokens"]))
        text = "".join(t["text"] for t in tokens)
        details = {"finish_reason": "length", "generated_tokens": len(tokens), "seed": None}
        if not body.get("stream"):
            return JSONResponse([{"generated_text": text, "details": {**details, "prefill": [], "tokens": tokens}}])

        def events():
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                yield "data:" + json.dumps({"index": i, "token": token, "top_tokens": None,
                                            "generated_text": text if last else None,
                                            "details": details if last else None}) + "\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app
