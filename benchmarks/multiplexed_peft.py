"""The baseline for serve_load.py: many adapters the way Ray's documentation suggests for many models.

Every model in the given dtype, as polyhead's. One Ray Serve deployment, the HTTP entry itself (as in Ray's "Model Multiplexing" guide), with
`@serve.multiplexed(max_num_models_per_replica=8)`: each adapter id is its own PEFT model, built on
first use by `PeftModel.from_pretrained` on a fresh copy of the base and evicted LRU beyond 8.
The client names the adapter in the `serve_multiplexed_model_id` header (Ray's proxy routes on it) and
in the body's "model", exactly as for polyhead. Requests are batched with `@serve.batch`, which Ray
splits by model id before the batch function runs: every forward holds rows of one adapter only.
The loader and the forward run off the replica's event loop, on one worker thread (torch already uses
every core), as polyhead's ModelServer runs its forward; Ray's multiplex wrapper loads one model at a time.

Routes, beside polyhead's: POST /v1/embeddings (mean of the last hidden state over real tokens, as
polyhead's embedding) and /v1/classify (the PEFT model's logits and softmax), one input per request;
`counts()` (a handle method): this replica's id, forwards, rows, model loads and their seconds, ongoing
requests. With num_replicas > 1, Ray's router sends each adapter id to a replica that has it when it can.
"""
from __future__ import annotations


def multiplexed_app(base_dir: str, adapter_dirs: dict[str, str], *, num_labels: int = 2, max_models: int = 8,
                    max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01, num_threads: int = 1,
                    num_cpus: float = 1, max_ongoing_requests: int = 64, max_queued_requests: int = -1,
                    num_replicas: int = 1, dtype: str = "float32"):
    """The Application (bind it with serve.run). Defined in a function: Ray ships the class by value."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
                      ray_actor_options={"num_cpus": num_cpus}, num_replicas=num_replicas)
    class MultiplexedPeft:
        def __init__(self):
            import torch
            import transformers

            self.dtype = getattr(torch, dtype)  # every model's weights and compute, as polyhead's Engine
            from transformers import AutoTokenizer

            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(num_threads)
            self.worker = ThreadPoolExecutor(max_workers=1)  # model work, off the event loop
            transformers.logging.set_verbosity_error()  # each load reports the base's fresh classifier
            self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
            self.n = {"forwards": 0, "rows": 0, "loads": 0, "load_s": 0.0, "ongoing": 0}

        async def off_loop(self, fn, *args):
            import asyncio

            return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

        def load(self, model_id: str):
            from peft import PeftModel
            from transformers import AutoModelForSequenceClassification

            base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, dtype=self.dtype)
            return PeftModel.from_pretrained(base, adapter_dirs[model_id]).to(self.dtype).eval()

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            import time

            start = time.perf_counter()
            model = await self.off_loop(self.load, model_id)
            self.n["loads"] += 1
            self.n["load_s"] += time.perf_counter() - start
            return model

        def counts(self) -> dict:
            return dict(self.n, replica=serve.get_replica_context().replica_id.unique_id)

        async def __call__(self, request: Request):
            path = request.url.path
            model_id = serve.get_multiplexed_model_id()
            try:
                body = await request.json()
                text = body["input"]
            except (ValueError, KeyError, TypeError):
                return JSONResponse({"error": {"message": "expected {\"model\", \"input\"}"}}, status_code=400)
            if model_id not in adapter_dirs or body.get("model") != model_id:
                return JSONResponse({"error": {"message": f"unknown model {model_id!r}"}}, status_code=404)
            need = "embedding" if path.endswith("/v1/embeddings") else "logits"
            self.n["ongoing"] += 1
            try:
                out = await self.run_batch((text, need))
            finally:
                self.n["ongoing"] -= 1
            if need == "embedding":
                return JSONResponse({"object": "list", "model": model_id,
                                     "data": [{"object": "embedding", "index": 0, "embedding": out}]})
            probs = out["probs"]
            label = max(range(len(probs)), key=probs.__getitem__)
            return JSONResponse({"data": [{"index": 0, "model": model_id, "label": f"LABEL_{label}",
                                           "probs": probs, "logits": out["logits"]}]})

        def forward(self, model, items: list[tuple[str, str]]) -> list:
            import torch

            enc = self.tokenizer([text for text, _ in items], padding=True, return_tensors="pt")
            with torch.inference_mode():
                out = model(**enc, output_hidden_states=True)
            mask = enc["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)  # [B, T, 1]
            embeddings = ((out.hidden_states[-1] * mask).sum(1) / mask.sum(1)).float()  # [B, H]
            logits = out.logits.float()
            probs = logits.softmax(-1)  # [B, num_labels]
            return [embeddings[i].tolist() if need == "embedding"
                    else {"logits": logits[i].tolist(), "probs": probs[i].tolist()}
                    for i, (_, need) in enumerate(items)]

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def run_batch(self, items: list[tuple[str, str]]) -> list:
            model = await self.get_model(serve.get_multiplexed_model_id())  # one id per batch (Ray splits)
            out = await self.off_loop(self.forward, model, items)
            self.n["forwards"] += 1
            self.n["rows"] += len(items)
            return out

    return MultiplexedPeft.bind()
