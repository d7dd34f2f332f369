"""llm_service's engine with no server, in llama-batched-bench's shape: the counterpart of it.

For each batch size B: B requests at once, each a prompt of about ``--prompt`` tokens (its
own), greedy, ``--generate`` tokens each, through ``Engine.generate`` in this process (batched
mode, B slots at least), run ``--runs`` times. Prints one JSON object: by B, the generated
tokens/s over the whole run (B x generated / T, prompts included: llama-batched-bench's
B x TG / T) and of the decode steps alone (the engine's step counters: llama-batched-bench's
S_TG), each the median of the runs. ``compare.py`` runs it after llama-batched-bench, batch
size by batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from compare import long_prompt

from llm_service.engine import (
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    Started,
    TokenDelta,
)
from llm_service.engine.llama import LlamaBackend


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(b) for b in args.sizes.split(",")]
    backend = LlamaBackend.load(
        args.model, n_ctx=args.ctx, n_threads=args.threads, pool_mode="batched", slots=max(sizes)
    )
    engine = await Engine.start(backend, EngineConfig(pool_size=max(sizes), max_queue=0))
    sampling = SamplingParams(max_tokens=args.generate, temperature=0)
    first = 0

    prompt_tokens: list[int] = []

    async def one(i: int) -> int:
        request = GenerationRequest(prompt=long_prompt(i, args.prompt), sampling=sampling)
        tokens = 0
        async for event in engine.generate(request):
            if isinstance(event, Started):
                prompt_tokens.append(event.prompt_tokens)
            elif isinstance(event, TokenDelta):
                tokens += len(event.token_ids)
        return tokens

    whole: dict[int, float] = {}
    decode: dict[int, float] = {}
    try:
        await one(10_000)  # warm-up
        for batch in sizes:
            runs, steps = [], []
            for _ in range(args.runs):
                before = engine.step_counts()["decode"]
                started = time.perf_counter()
                tokens = sum(await asyncio.gather(*(one(first + i) for i in range(batch))))
                elapsed = time.perf_counter() - started
                after = engine.step_counts()["decode"]
                first += batch
                runs.append(tokens / elapsed)
                steps.append((after.tokens - before.tokens) / (after.seconds - before.seconds))
            whole[batch] = round(statistics.median(runs), 1)
            decode[batch] = round(statistics.median(steps), 1)
    finally:
        await engine.aclose()
    return {
        "end_to_end": whole,
        "tg": decode,
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens[1:]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--sizes", default="1,2,4,8,16", help="batch sizes, comma-separated")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens, about")
    parser.add_argument("--generate", type=int, default=96, help="tokens generated each")
    parser.add_argument("--ctx", type=int, default=256, help="context per slot")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
