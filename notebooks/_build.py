"""Writes the quickstart notebooks from the cells below (run: python notebooks/_build.py).

Kept as code so that a notebook's diff is readable; the .ipynb files are committed too,
for people who open them directly.
"""

import hashlib
import inspect
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def md(text: str):
    """A markdown cell from an indented triple-quoted string."""
    return new_markdown_cell(inspect.cleandoc(text))


def code(text: str):
    """A code cell from an indented triple-quoted string."""
    return new_code_cell(inspect.cleandoc(text))


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
    "02_paid_datasets.ipynb": [
        md("""
            # Paid datasets

            A seller sells a dataset shard by shard; a buyer streams it with the ordinary `datasets`
            streaming API and pays for each shard once, from an escrow, just before the stream opens
            it. What the buyer does not read stays in the escrow and is refunded. Everything runs
            locally: an embedded SQLite ledger and the seller's shard server on 127.0.0.1.
        """),
        code("""
            import os, tempfile
            os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run
            import hf_escrow

            buyer, seller = hf_escrow.connect(agent='nb-buyer'), hf_escrow.connect(agent='nb-data-seller')
            buyer.register()  # the buyer's key stays with the buyer: the shard server gets spend tokens
            seller.register()
            print('faucet:', buyer.claim_faucet(), 'USDC')
        """),
        md("""
            The seller's data: four parquet shards of 250 labelled reviews. A shard is the unit of
            sale, one file at one price, like the `train-0000k-of-0000n.parquet` files of a Hub
            dataset.
        """),
        code("""
            from pathlib import Path
            import datasets

            SHARDS, ROWS = 4, 250
            shard_dir = Path(tempfile.mkdtemp()) / 'reviews'
            shard_dir.mkdir()
            datasets.disable_progress_bars()  # the paid-shards bar further down is the one worth watching
            for s in range(SHARDS):
                ids = list(range(s * ROWS, (s + 1) * ROWS))
                datasets.Dataset.from_dict({
                    'id': ids,
                    'text': [f'review {i}: ' + ('a solid product' if i % 3 else 'broke in a week') for i in ids],
                    'label': [int(i % 3 != 0) for i in ids],
                }).to_parquet(shard_dir / f'train-{s:05d}-of-{SHARDS:05d}.parquet')
            datasets.enable_progress_bars()
            sorted(p.name for p in shard_dir.iterdir())
        """),
        md("""
            ## The seller serves the shards

            `create_shard_app` serves every parquet, jsonl, csv and arrow file of the folder with
            HEAD and Range requests, as `datasets` streaming needs, and lists them with their price
            and Arrow schema at `GET /`. A request must carry the spend token of an escrow with
            this seller (`X-Escrow-Token: est_...`, which `create_escrow` returns); a buyer API key
            is refused. The first read of a shard by an escrow pays its price, once: the seller's
            till holds the price on the escrow and captures it. Here the server runs in a
            background thread of this kernel; `hf-escrow datasets serve DIR --seller NAME --price-per-shard 0.002` does the
            same from a shell.
        """),
        code("""
            import socket, threading, time
            from decimal import Decimal
            import httpx, uvicorn
            from hf_escrow.shardserver import create_shard_app

            PRICE = Decimal('0.002')
            app = create_shard_app(shard_dir, escrow=seller, price_per_shard=PRICE)
            with socket.socket() as sock:  # a free port, so that several runs can share the machine
                sock.bind(('127.0.0.1', 0))
                port = sock.getsockname()[1]
            server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 30
            while not server.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError('the shard server did not start within 30 s')
                time.sleep(0.05)
            url = f'http://127.0.0.1:{port}/'
            listing = httpx.get(url, timeout=10).json()
            print('seller', listing['seller'], 'at', listing['price_per_shard'], 'USDC per shard')
            for f in listing['files']:
                print(f"  {f['path']}  {f['size']} bytes")
        """),
        md("""
            ## The buyer streams and pays per shard

            `load_paid_dataset` opens an escrow of `budget` USDC with the seller the listing names,
            sends the shard server its spend token (never the buyer's key), and returns the ordinary
            streaming `IterableDataset`: `iter`, `map`, `filter`,
            `shuffle` or a torch `DataLoader` work as usual. Loading reads no shard (the columns
            come from the listing); each shard is paid for just before the stream opens it.
        """),
        code("""
            ds = hf_escrow.load_paid_dataset(url, escrow=buyer, budget='0.01')
            print(ds.features, ds.num_shards, 'shards, escrow', ds.escrow_id)

            rows = positives = 0
            for batch in ds.iter(batch_size=100):
                rows += len(batch['id'])
                positives += sum(batch['label'])
            escrow = buyer.get(ds.escrow_id)
            print(f'{rows} rows, {positives / rows:.1%} positive')
            print('escrow', escrow.amount, 'paid', escrow.paid, 'remaining', escrow.remaining)
            assert rows == SHARDS * ROWS and escrow.paid == SHARDS * PRICE
        """),
        md("""
            A second epoch costs nothing: each shard's capture carries an idempotency key made of
            the escrow and the shard, so rereads, retries, resumed streams and a second server
            process never pay twice. The escrow's log shows one hold per shard, captured in full.
        """),
        code("""
            complaints = ds.filter(lambda r: r['label'] == 0).map(lambda r: {'n_words': len(r['text'].split())})
            print(sum(1 for _ in complaints), 'complaints')
            escrow = buyer.get(ds.escrow_id)
            assert escrow.paid == SHARDS * PRICE
            for event in escrow.events:
                if event.kind == 'hold_closed':
                    print(event.data['hold_id'], 'captured', event.data['captured_micro'], 'micro-USDC')
            assert escrow.held == 0 and [e.kind for e in escrow.events].count('hold_closed') == SHARDS
        """),
        md("""
            The buyer is done: it releases nothing more (every shard was paid as it was read), and
            the remainder goes back to it. For every escrow the ledger keeps `amount == paid +
            refunded + held + remaining`; the seller got what was paid less the 1% platform fee.
        """),
        code("""
            receipt = buyer.release(ds.escrow_id, '0')
            escrow = buyer.get(ds.escrow_id)
            print(escrow.status, 'amount', escrow.amount, 'paid', escrow.paid, 'refunded', escrow.refunded,
                  'fees', escrow.fees)
            assert escrow.status == 'released' and receipt.refunded == escrow.refunded == escrow.amount - escrow.paid
            assert escrow.amount == escrow.paid + escrow.refunded and escrow.remaining == 0
            assert seller.me().balance == escrow.paid - escrow.fees
            print('seller balance', seller.me().balance)
        """),
        md("""
            ## A budget is a hard cap

            An escrow that cannot pay for the next shard stops the stream with `InsufficientFunds`
            between two shards, never inside one: the buyer keeps whole shards, and the server
            sends no byte of a shard that is not paid for. 0.005 USDC buys two shards.
        """),
        code("""
            capped = hf_escrow.load_paid_dataset(url, escrow=buyer, budget='0.005', progress=False)
            read = 0
            try:
                for row in capped:
                    read += 1
            except hf_escrow.InsufficientFunds as error:
                print('stopped after', read, 'rows:', error)
            escrow = buyer.get(capped.escrow_id)
            assert read == 2 * ROWS and escrow.paid == 2 * PRICE
            buyer.release(capped.escrow_id, '0')
            escrow = buyer.get(capped.escrow_id)
            print(escrow.status, 'paid', escrow.paid, 'refunded', escrow.refunded)
            assert escrow.amount == escrow.paid + escrow.refunded
        """),
        md("Stop the shard server."),
        code("""
            server.should_exit = True
            thread.join(timeout=15)
            assert not thread.is_alive()
            print('seller balance', seller.me().balance, '| buyer balance', buyer.me().balance)
        """),
    ],
    "03_paid_gradio.ipynb": [
        md("""
            # Paid Gradio calls

            A Gradio app whose endpoint is paid per call from the caller's escrow, with the
            `@hf_escrow.paid` decorator. The buyer is an agent that calls the app with
            `gradio_client` and pays with the escrow's spend token, one header. The gate charges
            only for results that leave the app: a refused call never runs the function, and a call
            whose function fails costs nothing. Everything runs locally: an embedded SQLite ledger
            and the app on 127.0.0.1.
        """),
        code("""
            import os, tempfile
            os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run
            os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')   # keep Gradio on 127.0.0.1
            from decimal import Decimal
            import hf_escrow

            buyer, seller = hf_escrow.connect(agent='nb-buyer'), hf_escrow.connect(agent='nb-space')
            buyer.register()  # the buyer's key never goes to the app: callers pay with spend tokens
            seller.register()
            print('faucet:', buyer.claim_faucet(), 'USDC')
        """),
        md("""
            ## The seller's app

            `@hf_escrow.paid(price=..., seller=...)` wraps the handler. Before it runs, the gate
            holds the price on the escrow the caller's spend token names: the ledger checks that
            the token is live and that the escrow pays this seller and has the price free. When the
            function returns, the gate captures the price and only then hands the result back; if
            the function raises, the hold is voided and nothing moves. `with_receipt=True` adds the receipt as a second
            output. Any function works; a word counter stands in for a model here.
        """),
        code("""
            import socket
            import gradio as gr

            PRICE = Decimal('0.001')

            @hf_escrow.paid(price=PRICE, seller=seller, with_receipt=True)
            def word_stats(text: str) -> str:
                words = text.split()
                if not words:
                    raise ValueError('nothing to count')
                return f'{len(words)} words, {len({w.lower() for w in words})} distinct'

            with gr.Blocks() as demo:
                text, answer, receipt = gr.Textbox(label='text'), gr.Textbox(label='answer'), gr.JSON(label='receipt')
                gr.Button('Count').click(word_stats, text, [answer, receipt], api_name='word_stats')

            with socket.socket() as sock:  # a free port, so that several runs can share the machine
                sock.bind(('127.0.0.1', 0))
                port = sock.getsockname()[1]
            demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True, inline=False)
            url = f'http://127.0.0.1:{port}/'
            url
        """),
        md("""
            ## The buyer calls it

            The buyer opens an escrow for the seller and sends its spend token in the
            `X-Escrow-Token` header; `gradio_client` sends it with every call. Each answer comes with what was charged,
            what the seller received after the 1% platform fee, and what is left.
        """),
        code("""
            from gradio_client import Client

            escrow = buyer.create_escrow('nb-space', '0.005', ttl_seconds=600)
            client = Client(url, headers={'X-Escrow-Token': escrow.spend_token}, verbose=False)
            for sentence in ['the cat sat on the mat', 'paid per call', 'one two three four']:
                out, paid = client.predict(sentence, api_name='/word_stats')
                print(f"{out:<22} charged {paid['charged_usdc']}  seller got {paid['seller_net_usdc']}  "
                      f"left {paid['remaining_usdc']}")
            print('seller balance', seller.me().balance)
            assert buyer.get(escrow.id).paid == 3 * PRICE
        """),
        md("""
            A caller without an escrow is refused before the function runs, and a call whose
            function fails is not charged: the caller gets the error, the escrow is as it was, and
            the app logs the handler's traceback for the seller (printed below, as a server would).
        """),
        code("""
            from gradio_client.exceptions import AppError

            try:
                Client(url, verbose=False).predict('free lunch?', api_name='/word_stats')
            except AppError as error:
                print('no escrow:', error)
            try:
                client.predict('   ', api_name='/word_stats')
            except AppError as error:
                print('failed call:', error)
            escrow = buyer.get(escrow.id)
            assert escrow.paid == 3 * PRICE and escrow.remaining == escrow.amount - 3 * PRICE
        """),
        md("""
            The buyer closes the escrow: it releases nothing more (each call was paid when it was
            served) and the remainder comes back to it. For every escrow the ledger keeps `amount
            == paid + refunded + held + remaining`.
        """),
        code("""
            buyer.release(escrow.id, '0')
            escrow = buyer.get(escrow.id)
            print(escrow.status, 'amount', escrow.amount, 'paid', escrow.paid, 'refunded', escrow.refunded,
                  'fees', escrow.fees)
            assert escrow.status == 'released' and escrow.amount == escrow.paid + escrow.refunded
            assert seller.me().balance == escrow.paid - escrow.fees
            print('seller balance', seller.me().balance, '| buyer balance', buyer.me().balance)
        """),
        md("Close the app."),
        code("demo.close()"),
    ],
    "04_finetune_job.ipynb": [
        md("""
            # A benchmark-gated fine-tune job

            A buyer wants a LoRA adapter for a classification task and pays only if the adapter
            meets a benchmark on held-out data the seller never sees. The buyer locks the budget
            in an escrow whose release condition is the benchmark; the seller trains with PEFT and
            the transformers `Trainer` and submits its score with the adapter's sha256; the buyer
            scores the adapter again, on its own data. A pass releases the escrow to the seller, a
            fail leaves the money with the buyer. The base model is the packaged
            all-MiniLM-L6-v2, so nothing is downloaded; the job takes about a minute on 2 CPU cores.
        """),
        code("""
            import os, tempfile
            os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run
            import datasets, transformers
            import hf_escrow

            # quiet the loading bars and the expected "classifier newly initialized" notice:
            # that head is exactly what the job trains
            datasets.disable_progress_bars()
            transformers.logging.disable_progress_bar()
            transformers.logging.set_verbosity_error()

            buyer, seller = hf_escrow.connect(agent='nb-buyer'), hf_escrow.connect(agent='nb-trainer')
            buyer.register(); seller.register()
            print('faucet:', buyer.claim_faucet(), 'USDC')
        """),
        md("""
            ## The job

            The job of `jobs/minilm-negation-sentiment.toml`, for this notebook's seller: the
            sentiment of short reviews in which a negation flips the adjective ("the staff was
            hardly rude"), accuracy >= 0.9 on 400 held-out reviews. A linear probe on the frozen
            sentence embeddings reaches about 0.84, so passing takes real fine-tuning. `[training]`
            holds the seller's defaults and `[limits]` the buyer's ceilings; a run asking for more
            is refused before it starts.
        """),
        code('''
            from pathlib import Path

            SPEC = """
            name = "minilm-negation-sentiment"
            description = "LoRA on all-MiniLM-L6-v2: sentiment with negations, accuracy >= 0.9 held out"
            task = "sequence-classification"
            base_model = "sentence-transformers/all-MiniLM-L6-v2"

            [escrow]
            seller = "nb-trainer"
            verifier = "buyer"          # the buyer re-scores the adapter; "self" would pay on the seller's word
            budget_usdc = "2.00"
            ttl_seconds = 3600

            [benchmark]
            metric = "accuracy"
            threshold = 0.9
            higher_is_better = true

            [data]
            train = "data/train.jsonl"
            held_out = "data/held_out.jsonl"   # stays with the buyer; the escrow holds only its sha256
            text_field = "text"
            label_field = "label"
            labels = ["negative", "positive"]

            [data.generate]
            generator = "negation-sentiment"
            train_seed = 1
            train_rows = 800
            held_out_seed = 2
            held_out_rows = 400

            [training]
            epochs = 2
            learning_rate = 1e-3
            batch_size = 8
            eval_batch_size = 64
            max_length = 32
            lora_r = 8
            lora_alpha = 32
            lora_dropout = 0.05
            target_modules = ["query", "key", "value", "dense"]
            validation_fraction = 0.1
            seed = 0
            threads = 1                 # batches this small gain little from more, and a busy CPU loses a lot

            [limits]
            max_epochs = 4
            max_steps = 1000
            max_train_rows = 5000
            max_wall_seconds = 900
            """
            job_dir = Path(tempfile.mkdtemp())
            spec_path = job_dir / 'minilm-negation-sentiment.toml'
            spec_path.write_text(SPEC)
            print(spec_path)
        '''),
        md("""
            ## The buyer posts it

            `post_job` generates the training and held-out data (deterministic) and locks the budget
            in a benchmark escrow. The escrow's meta carries the job: base model, training data
            and its sha256, metric, threshold, training settings and limits. The held-out data is
            only committed to, by sha256 and row count, so the buyer cannot swap it later.
        """),
        code("""
            from hf_escrow.finetune import job_status, post_job, run_job, submit_job, verify_job

            job = post_job(buyer, spec_path)
            print(job.id, job.status, job.amount, 'USDC locked')
            print('release condition:', job.release_condition)
            print('held-out commitment:', job.meta['job']['held_out'])
            print('buyer balance', buyer.me().balance)
        """),
        md("""
            ## The seller trains and submits

            The seller reads the job from the escrow, trains the LoRA adapter, scores it on its
            own validation split and submits that score with the adapter's sha256. Nothing is paid
            yet: with the buyer as verifier, the escrow waits for the buyer's verdict.
        """),
        code("""
            run = run_job(seller, job.id, log=print)
            print(f'{run.result.steps} steps in {run.seconds:.0f} s; seller score {run.result.score:.3f}, '
                  f'escrow {run.receipt.status}, paid so far {run.receipt.gross}')
            assert run.receipt.status == 'awaiting_verification' and run.receipt.gross == 0
        """),
        md("""
            ## The buyer verifies, and the escrow pays out on a pass

            `verify_job` copies the adapter, checks its sha256 against the submitted one, scores it
            on the held-out reviews and records the verdict on the ledger, which releases the
            escrow when the score meets the threshold.
        """),
        code("""
            verdict = verify_job(buyer, job.id, log=print)
            paid = verdict.receipt
            print(f'held-out accuracy {verdict.score:.3f} vs threshold {verdict.threshold}: '
                  f"{'pass' if verdict.passed else 'fail'}")
            print('payout: gross', paid.gross, 'fee', paid.fee, 'seller net', paid.net, '| escrow', paid.status)
            escrow = buyer.get(job.id)
            assert verdict.passed and escrow.status == 'released' and escrow.paid == escrow.amount
            assert escrow.amount == escrow.paid + escrow.refunded + escrow.remaining
            assert seller.me().balance == paid.net
            print('seller balance', seller.me().balance, '| buyer balance', buyer.me().balance)
        """),
        md("""
            ## What the gate is for

            A seller who cuts corners (8 training steps instead of 180) and claims 0.99 anyway.
            The claim is not what is paid for: the buyer's own score decides, the verdict fails
            and the escrow goes back to active, where the seller may submit a better adapter until
            the escrow's TTL refunds the buyer. Here the buyer takes its money back at once.
        """),
        code("""
            cheap = post_job(buyer, spec_path)
            quick = run_job(seller, spec_path, training={'max_steps': 8}, submit=False,  # train only
                            output_dir=job_dir / 'quick')
            submit_job(seller, cheap.id, quick.result, score=0.99)
            check = verify_job(buyer, cheap.id)
            print(f'claimed {check.submitted_score}, measured {check.score:.3f} vs {check.threshold}: '
                  f"{'pass' if check.passed else 'fail'}; escrow {check.receipt.status}, paid {check.receipt.gross}")
            refund = buyer.cancel(cheap.id, reason='adapter failed the benchmark')
            escrow = buyer.get(cheap.id)
            assert not check.passed and escrow.paid == 0 and escrow.refunded == escrow.amount == refund.refunded
            print('refunded', refund.refunded)
        """),
        code("""
            for s in job_status(buyer):
                print(f'{s.escrow_id}  {s.status:<9} {s.verdict:<7} claimed {s.submitted_score:.3f} '
                      f'verified {s.verified_score:.3f}  paid {s.paid}  refunded {s.refunded}')
        """),
    ],
    "05_per_second_space.ipynb": [
        md("""
            # A Space paid per second of compute

            A handler that runs 0.1 s should not cost what one that runs 4 s costs. With
            `per="second"` the gate holds the worst case (`max_seconds` x the price) before the
            handler runs, times the handler itself, captures the measured seconds x the price and
            frees the rest. Gradio's queue wait is not billed, and neither is the gate's own ledger
            work. Everything runs locally: an embedded SQLite ledger and the app on 127.0.0.1.
        """),
        code("""
            import os, tempfile
            os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run
            os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')   # keep Gradio on 127.0.0.1
            import socket, time
            from decimal import Decimal
            import gradio as gr
            import hf_escrow

            buyer, seller = hf_escrow.connect(agent='nb-buyer'), hf_escrow.connect(agent='nb-gpu-space')
            buyer.register()
            seller.register()
            print('faucet:', buyer.claim_faucet(), 'USDC')
        """),
        md("""
            ## The seller's app

            The price is a sheet: 0.0005 USDC per GPU-second on `a10g-largex2`, two GPUs, so a
            second costs 0.001 USDC. A sleep proportional to the input stands in for a model. On a
            ZeroGPU Space, `gpu=True` would also run the handler under `@spaces.GPU(duration=
            max_seconds)`, inside the gate's clock, so the wait for a GPU would not be billed either.
        """),
        code("""
            sheet = hf_escrow.Pricing(per_gpu_second='0.0005', hardware='a10g-largex2')
            print('rate:', sheet.second_rate, 'USDC per second')

            @hf_escrow.paid(price=sheet, per='second', max_seconds=5, seller=seller, with_receipt=True)
            def render(steps: float) -> str:
                if steps < 0:
                    raise ValueError('steps must be positive')
                time.sleep(steps / 10)          # the model's work: 0.1 s a step
                return f'rendered {steps:g} steps'

            with gr.Blocks() as demo:
                steps, answer, receipt = gr.Number(label='steps'), gr.Textbox(label='answer'), gr.JSON(label='receipt')
                gr.Button('Render').click(render, steps, [answer, receipt], api_name='render')

            with socket.socket() as sock:  # a free port, so that several runs can share the machine
                sock.bind(('127.0.0.1', 0))
                port = sock.getsockname()[1]
            demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True, inline=False)
            url = f'http://127.0.0.1:{port}/'
        """),
        md("""
            ## The buyer calls it

            One escrow, its spend token in one header. Short and long calls each pay their own run
            time; the hold for 5 s (0.005 USDC) is taken before each call and what it did not use
            goes back to the escrow at once.
        """),
        code("""
            from gradio_client import Client

            escrow = buyer.create_escrow('nb-gpu-space', '0.05', ttl_seconds=600)
            client = Client(url, headers={'X-Escrow-Token': escrow.spend_token}, verbose=False)
            for n in (1, 5, 12):
                text, r = client.predict(n, api_name='/render')
                print(f"{text:<20} {r['seconds'][:6]} s x {r['rate_usdc_per_s']} USDC/s = {r['charged_usdc']} USDC")
                assert abs(Decimal(r['charged_usdc']) - Decimal(r['seconds']) * sheet.second_rate) <= Decimal('0.000001')
        """),
        md("""
            A handler that raises costs nothing, and the escrow adds up: locked = paid + remaining,
            nothing left held.
        """),
        code("""
            from gradio_client.exceptions import AppError

            before = buyer.get(escrow.id).paid
            try:
                client.predict(-1, api_name='/render')
            except AppError as error:
                print('refused:', error)
            after = buyer.get(escrow.id)
            assert after.paid == before and after.held == 0
            assert after.amount == after.paid + after.refunded + after.held + after.remaining
            print('paid', after.paid, 'remaining', after.remaining, 'held', after.held)
            demo.close()
        """),
    ],
    "06_milestone_job.ipynb": [
        md("""
            # A milestone fine-tune job: paid as the adapter gets better

            A single benchmark pays all or nothing at the end, after the seller carried all the
            risk. A milestone escrow splits the budget: each milestone is a threshold on the
            buyer's held-out data and the share of the escrow it releases. The seller's run scores
            its adapter every few steps and submits a stage's snapshot as soon as it reaches the
            next milestone; the buyer re-scores each one, and each pass pays that share at once
            (fee and referral as usual). A milestone never reached goes back to the buyer. The
            base model is the packaged all-MiniLM-L6-v2; about a minute on 2 CPU cores.
        """),
        code("""
            import os, tempfile, threading, time
            os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run
            import datasets, transformers
            import hf_escrow

            datasets.disable_progress_bars()
            transformers.logging.disable_progress_bar()
            transformers.logging.set_verbosity_error()

            buyer, seller = hf_escrow.connect(agent='nb-buyer'), hf_escrow.connect(agent='nb-trainer')
            buyer.register(); seller.register()
            print('faucet:', buyer.claim_faucet(), 'USDC')
        """),
        md("""
            ## The job

            As `jobs/minilm-negation-milestones.toml`, smaller: 400 training reviews, 200 held
            out, a stage every 10 steps, 60 steps in all. Accuracy 0.70 releases 30% of the
            budget, 0.78 another 40%, and 0.95 (which so short a run does not reach) the rest.
        """),
        code('''
            from pathlib import Path

            SPEC = """
            name = "minilm-negation-milestones"
            task = "sequence-classification"
            base_model = "sentence-transformers/all-MiniLM-L6-v2"

            [escrow]
            seller = "nb-trainer"
            verifier = "buyer"          # milestones need a verifier other than the seller
            budget_usdc = "2.00"
            ttl_seconds = 3600

            [benchmark]
            metric = "accuracy"
            milestones = [
                { threshold = 0.70, share_bps = 3000 },   # 30%
                { threshold = 0.78, share_bps = 4000 },   # 40%
                { threshold = 0.95, share = "rest" },     # whatever the others leave
            ]

            [data]
            train = "data/train.jsonl"
            held_out = "data/held_out.jsonl"
            labels = ["negative", "positive"]

            [data.generate]
            generator = "negation-sentiment"
            train_rows = 400
            held_out_rows = 200

            [training]
            max_steps = 60
            stage_steps = 10            # score and snapshot the adapter every 10 steps
            learning_rate = 1e-3
            max_length = 32
            lora_alpha = 32
            target_modules = ["query", "key", "value", "dense"]
            threads = 1
            """
            job_dir = Path(tempfile.mkdtemp())
            spec_path = job_dir / 'minilm-negation-milestones.toml'
            spec_path.write_text(SPEC)
        '''),
        code("""
            from hf_escrow.finetune import job_status, post_job, run_job, verify_job

            job = post_job(buyer, spec_path)
            for m in job.milestones:
                print(f'milestone {m.number}: accuracy >= {m.threshold} releases {m.amount} USDC')
        """),
        md("""
            ## Seller and buyer at work

            The seller trains in a thread of its own (in practice, on its own machine: `hf-escrow
            jobs run`). At each stage that reaches the next milestone it submits that stage's
            adapter and waits for the verdict before it submits the next one. The buyer verifies
            whenever a milestone awaits it (`hf-escrow jobs verify`): a score below pays nothing
            and the seller tries again from a later stage; a pass pays the share at once.
        """),
        code("""
            runs = []
            trainer = threading.Thread(target=lambda: runs.append(run_job(seller, job.id, wait_s=300)))
            trainer.start()
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                if buyer.get(job.id).status == 'awaiting_verification':
                    v = verify_job(buyer, job.id)
                    print(f'milestone {v.milestone}: held-out accuracy {v.score:.3f} vs {v.threshold} -> '
                          f"{'pass, paid ' + str(v.receipt.gross) + ' USDC' if v.passed else 'fail, nothing paid'}")
                elif not trainer.is_alive():
                    break
                else:
                    time.sleep(0.2)
            trainer.join()
            print('stages (step, validation accuracy):', runs[0].stages)
        """),
        code("""
            [status] = job_status(buyer, job.id)
            for m in status.milestones:
                print(f'milestone {m.number}: {m.status:<6} paid {m.paid} of {m.amount}')
            escrow = buyer.get(job.id)
            assert [m.status for m in escrow.milestones][:2] == ['paid', 'paid']
            assert escrow.amount == escrow.paid + escrow.refunded + escrow.held + escrow.remaining
            print('seller balance', seller.me().balance, '(the fee is 1%)')
        """),
        md("""
            ## The rest goes back to the buyer

            The last milestone was not reached. At the escrow's TTL its share is refunded; here
            the buyer ends the job at once. What was paid stays paid.
        """),
        code("""
            refund = buyer.cancel(job.id, reason='stopping after two milestones')
            escrow = buyer.get(job.id)
            assert escrow.refunded == refund.refunded == escrow.milestones[2].amount and escrow.remaining == 0
            print('paid', escrow.paid, '| refunded', escrow.refunded, '| buyer balance', buyer.me().balance)
        """),
    ],
    "07_agent_budget.ipynb": [
        md("""
            # An agent that pays by itself, on a budget

            A person funds an agent with a **budgeted key** of 1 USDC instead of the account's
            own key. The agent meets three paid faces it has never seen - a Gradio Space, the
            inference gateway before a local model, and a dataset on a shard server - and pays
            each through `hf_escrow.AutoPay`: every face answers an unpaid call with one
            machine-readable 402, AutoPay opens an escrow for the seller it names, within the
            key's mandate, and calls again. The person then sees what the agent spent, revokes
            the key, and gets the rest back. Everything runs locally: an embedded SQLite ledger,
            gemma-3-270m served by `transformers serve`, and the faces on 127.0.0.1.
        """),
        code("""
            import os, tempfile
            os.environ.setdefault('HF_ESCROW_HOME', tempfile.mkdtemp())  # a fresh ledger for this run
            os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')   # keep Gradio on 127.0.0.1
            import contextlib, json
            from decimal import Decimal
            import hf_escrow

            human = hf_escrow.connect(agent='nb-human')
            human.register()
            print('faucet:', human.claim_faucet(), 'USDC')
            sellers = {name: hf_escrow.connect(agent=name) for name in ('nb-space', 'nb-gateway', 'nb-data')}
            for seller in sellers.values():
                seller.register()
            start = human.me().balance
        """),
        md("""
            ## The human mints a key for the agent

            The key locks the human's money, but only within its mandate: 1 USDC in all (net of
            refunds), at most 0.25 in one escrow, only with these three sellers, for one hour. The
            ledger checks it inside each escrow's transaction, so every process holding the key
            shares the one budget. `api_key` is shown only once; the agent gets nothing else.
        """),
        code("""
            key = human.create_key(budget='1', sellers=list(sellers), max_escrow='0.25', expires_in=3600,
                                   label='research agent')
            agent = hf_escrow.connect(api_key=key.api_key)    # embedded here; a URL and the key over HTTP
            m = agent.mandate()
            print('budget', m.budget, '| max per escrow', m.max_escrow, '| sellers', m.sellers, '| left', m.left)
        """),
        md("""
            ## Three paid faces

            A Gradio app whose handler is paid per call (`gate.paid`), the gateway metering a
            local model per token, and the shard server selling parquet shards. Each publishes
            its offer at `/.well-known/hf-escrow`. The model starts in a few seconds (converted
            once from the packaged GGUF, then cached).
        """),
        code("""
            import socket
            import gradio as gr
            from hf_escrow.gate import Gate
            from hf_escrow.gateway import create_gateway
            from hf_escrow.localmodel import prepare_model, served_model
            from hf_escrow.serving import serve_in_thread
            from hf_escrow.shardserver import create_shard_app

            faces = contextlib.ExitStack()
            gate = Gate(sellers['nb-space'])

            @gate.paid(price='0.01')
            def summarize(text: str) -> str:
                words = text.split()
                return ' '.join(words[:5]) + (' ...' if len(words) > 5 else '')

            with gr.Blocks() as demo:
                box, out = gr.Textbox(), gr.Textbox()
                gr.Button('Summarize').click(summarize, box, out, api_name='summarize')
            with socket.socket() as sock:  # a free port, so that several runs can share the machine
                sock.bind(('127.0.0.1', 0))
                port = sock.getsockname()[1]
            demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True,
                        inline=False, app_kwargs={'routes': gate.discovery_routes()})
            faces.callback(demo.close)
            space_url = f'http://127.0.0.1:{port}'

            model_dir = prepare_model(home=os.environ.get('HF_ESCROW_TEST_MODEL_HOME'))
            upstream = faces.enter_context(served_model(model_dir))
            gateway_url = faces.enter_context(serve_in_thread(create_gateway(
                upstream, escrow=sellers['nb-gateway'], tokenizer=str(model_dir), max_tokens=16,
                pricing={'input_per_1k': '0.0005', 'output_per_1k': '0.0015'})))

            import datasets
            from pathlib import Path
            shard_dir = Path(tempfile.mkdtemp()) / 'papers'
            shard_dir.mkdir()
            datasets.disable_progress_bars()
            for s in range(4):
                ids = list(range(s * 50, (s + 1) * 50))
                datasets.Dataset.from_dict({'id': ids, 'abstract': [f'abstract {i}: escrow for agents' for i in ids]}
                                           ).to_parquet(shard_dir / f'train-{s:05d}-of-00004.parquet')
            shard_url = faces.enter_context(serve_in_thread(create_shard_app(
                shard_dir, escrow=sellers['nb-data'], price_per_shard='0.02')))
            import httpx
            for name, url in [('space', space_url), ('gateway', gateway_url), ('dataset', shard_url)]:
                offer = httpx.get(url + '/.well-known/hf-escrow', timeout=10).json()
                print(f"{name:<8} seller {offer['seller']:<11} prices {offer['pricing']}")
        """),
        md("""
            ## What an unpaid call gets

            A 402 whose body a program can act on: the scheme, the escrow server, the seller,
            the prices, the smallest useful escrow and the header to send the spend token in.
            The same facts travel in the `X-Escrow-Challenge` header.
        """),
        code("""
            refused = httpx.get(f'{shard_url}/train-00000-of-00004.parquet', timeout=10)
            print(refused.status_code, json.dumps({k: refused.json()[k] for k in (
                'reason', 'scheme', 'seller', 'pricing', 'min_escrow_micro', 'token_header')}, indent=1))
        """),
        md("""
            ## The agent pays by itself

            `AutoPay.from_key(agent)` takes the key's own mandate. Each face's first call meets
            the 402; AutoPay opens an escrow for that seller (sized for `calls_per_escrow`
            calls, capped by the mandate), calls again with its spend token, and reuses it for
            the calls after. The agent's code is the ordinary client code: `gradio_client`,
            `huggingface_hub.InferenceClient`, `datasets` streaming.
        """),
        code("""
            pay = hf_escrow.AutoPay.from_key(agent, calls_per_escrow=5)

            space = pay.gradio_client(space_url, verbose=False)
            for text in ['escrow holds the money while work streams', 'agents pay within a mandate']:
                print('space  :', space.predict(text, api_name='/summarize'))

            llm = pay.inference_client(gateway_url + '/v1')
            reply = llm.chat_completion([{'role': 'user', 'content': 'Say hi'}], model=str(model_dir), max_tokens=8)
            print('gateway:', repr(reply.choices[0].message.content), reply.usage.prompt_tokens, '+',
                  reply.usage.completion_tokens, 'tokens')

            files = [f'{shard_url}/train-{s:05d}-of-00004.parquet' for s in range(2)]
            papers = datasets.load_dataset('parquet', data_files=files, split='train', streaming=True,
                                           storage_options=pay.storage_options(shard_url))
            print('dataset:', sum(1 for _ in papers), 'rows from', len(files), 'shards')
            print('escrows AutoPay opened:', len(pay.escrow_ids))
        """),
        md("""
            ## The human sees what the agent spent

            The key's row: what it locked, what sellers were paid, what is still in escrow, and
            what it may still lock. The escrows are the human's (the buyer of record) and show
            in the human's history with the key that opened them.
        """),
        code("""
            [k] = human.keys()
            print(f'{k.label}: locked {k.locked} | paid {k.paid} | in escrow {k.in_escrow} | left {k.left} '
                  f'| escrows {k.escrows} ({k.escrows_open} open)')
            for e in human.history():
                print(f'  {e.id}  {e.seller:<11} amount {e.amount}  paid {e.paid}  key {e.key_id}')
            assert k.paid == Decimal('0.02') + Decimal('0.04') + sum(e.paid for e in human.history()
                                                                   if e.seller == 'nb-gateway')
        """),
        md("""
            ## The human revokes the key; the rest comes back

            Revoking stops the key at once; `cancel_escrows=True` also cancels what it still
            has open, refunded to the human. The agent's next call is refused with
            `KeyInactive` (a spent budget would raise `BudgetExceeded`), and its `close()` has
            nothing left to return.
        """),
        code("""
            revoked = human.revoke_key(key.key_id, cancel_escrows=True)
            print('revoked; cancelled', len(revoked.cancelled), 'escrows; in escrow now', revoked.in_escrow)
            try:
                space.predict('one more?', api_name='/summarize')
            except hf_escrow.KeyInactive as error:
                print('agent:', error)
            pay.close()
            spent = start - human.me().balance
            print('the agent spent', spent, 'USDC of its 1; the human has', human.me().balance)
            assert spent == revoked.paid and revoked.in_escrow == 0 and revoked.escrows_open == 0
            assert all(e.status == 'cancelled' for e in human.history())
        """),
        code("""
            faces.close()
            datasets.enable_progress_bars()
        """),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        for index, cell in enumerate(cells):  # stable ids: an unchanged notebook is rewritten byte for byte
            cell["id"] = hashlib.sha1(f"{name}:{index}".encode()).hexdigest()[:8]
        notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}})
        nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    main()
