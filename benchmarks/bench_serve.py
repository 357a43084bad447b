"""Serving benchmark: the internvl35 engine vs transformers `generate` (batched) on the same weights.

For N multimodal requests (mini-world images: 1-tile scenes, multi-tile high-resolution images,
multi-image prompts) at concurrency 1 / 8 / 32, both systems produce up to `--max-tokens` tokens per
request (exactly that many with `--ignore-eos`) from the same preprocessed prompts. The engine keeps
`concurrency` requests in flight (a new one enters as soon as one finishes); transformers runs
left-padded batches of `concurrency` requests. Reported side by side in one run (medians of alternating rounds): request
throughput, mean TTFT, mean time per output token, and the engine / transformers throughput ratio.

    .venv/bin/python benchmarks/bench_serve.py                 # mini
    .venv/bin/python benchmarks/bench_serve.py --compile       # the engine's decode steps compiled
    .venv/bin/python benchmarks/bench_serve.py --compile --pack-weights   # + packed LLM weights
    .venv/bin/python benchmarks/bench_serve.py --model 1B --n 8 --concurrency 1 8 --max-tokens 8
    .venv/bin/python benchmarks/bench_serve.py --device cuda  # both systems on a GPU, in bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

import internvl35
from internvl35.data.world import generate as world_sample
from internvl35.engine.llm_engine import EngineConfig, LLMEngine
from internvl35.hardware import reuse_freed_memory
from internvl35.sampling import SamplingParams
from internvl35.weights.convert import write_checkpoint

from bench_core import random_model  # noqa: E402 (a sibling script)


def checkpoint_dirs(model: str, tmp: Path) -> tuple[Path, Path]:
    """(our checkpoint, the same weights in HF format)."""
    if model == "mini":
        cm = internvl35.load("mini")
        src, m, tok = cm.path, cm.model, cm.tokenizer
    else:  # a random model of a real size
        m, tok = random_model(model)
        src = tmp / "ours"
        write_checkpoint(m, tok, src, "hf", torch.bfloat16)
    # transformers' InternVL has no Flash router: leave those weights out of its copy
    flash = ("mlp2.", "pooling_before_gating.", "gating.")
    params = {k: v for k, v in m.state_dict().items() if not k.startswith(flash)}
    write_checkpoint(m, tok, tmp / "hf", "hf", torch.float32, params=params)
    return src, tmp / "hf"


def workload(cm, n: int) -> list:
    """Short answers (counting, attributes, charts...) mixed with long ones (dense captions, thinking
    traces for visual arithmetic), as a chat service sees them."""
    fams = ["counting", "hires", "caption", "attributes", "multi_image", "arithmetic", "charts", "caption",
            "spatial", "video"]
    prompts = []
    for i in range(n):
        s = world_sample(fams[i % len(fams)], 2**50 + i)
        if s.video:
            prompts.append(cm.build_prompt(s.question, video=s.images))
        else:
            prompts.append(cm.build_prompt(s.question, s.images, thinking=s.thinking))
    return prompts


def summarize(start: dict, first: dict, end: dict, total: float, outs: list[list[int]]) -> dict:
    n = len(end)
    return {"req_s": n / total, "output_tokens": sum(map(len, outs)),
            "ttft_s": sum(first[i] - start[i] for i in end) / n,
            "tpot_s": sum((end[i] - first[i]) / max(len(outs[i]) - 1, 1) for i in end) / n}


def median_row(rows: list[dict]) -> dict:
    """Per-metric medians over rounds."""
    return {k: statistics.median_high(r[k] for r in rows) for k in rows[0]}


def run_engine(cm, prompts: list, conc: int, tokens: int, ignore_eos: bool, kv_gb: float) -> tuple[dict, list]:
    engine = LLMEngine(cm, EngineConfig(kv_cache_bytes=int(kv_gb * 2**30)))
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=ignore_eos)
    todo = deque(range(len(prompts)))
    start, first, end, outs = {}, {}, {}, {i: [] for i in range(len(prompts))}
    t0 = time.perf_counter()
    inflight = 0
    while todo or engine.has_unfinished():
        new = []
        while todo and inflight + len(new) < conc:
            new.append(todo.popleft())
            start[new[-1]] = time.perf_counter()
        # as the server does with the requests that arrived since the last step: one ViT pass
        for i, enc in zip(new, engine.encode_batch([(prompts[i], None) for i in new])):
            engine.add_request(str(i), enc, params)
        inflight += len(new)
        for o in engine.step():
            i, now = int(o.request_id), time.perf_counter()
            first.setdefault(i, now)
            outs[i] += o.token_ids
            if o.finished:
                end[i], inflight = now, inflight - 1
    outs = [outs[i] for i in range(len(prompts))]
    return summarize(start, first, end, time.perf_counter() - t0, outs), outs


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, _value) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_transformers(hf, pad_id: int, stop_id: int, prompts: list, conc: int, tokens: int,
                     ignore_eos: bool) -> tuple[dict, list]:
    start, first, end, outs = {}, {}, {}, []
    t0 = time.perf_counter()
    for b in range(0, len(prompts), conc):
        batch = prompts[b:b + conc]
        L = max(len(p.input_ids) for p in batch)
        ids = torch.full((len(batch), L), pad_id)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for j, p in enumerate(batch):
            ids[j, L - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[j, L - len(p.input_ids):] = 1
        ids, mask = ids.to(hf.device), mask.to(hf.device)
        pv = [p.pixel_values.to(hf.device, hf.dtype) for p in batch if p.pixel_values is not None]
        streamer = _FirstToken()
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pv) if pv else None,
                              max_new_tokens=tokens, min_new_tokens=tokens if ignore_eos else None,
                              do_sample=False, streamer=streamer, pad_token_id=pad_id, eos_token_id=stop_id)
        now = time.perf_counter()
        for j in range(len(batch)):
            start[b + j], first[b + j], end[b + j] = t, streamer.first or now, now
            row = out[j, L:].tolist()
            outs.append(row if ignore_eos or stop_id not in row else row[:row.index(stop_id) + 1])
    return summarize(start, first, end, time.perf_counter() - t0, outs), outs


def agree(ours: list[int], theirs: list[int], stop_ids: set[int]) -> bool:
    """Same tokens up to our first stop token (transformers' min_new_tokens bans the stop token, so
    the two continue differently after it)."""
    k = next((i for i, t in enumerate(ours) if t in stop_ids), len(ours))
    return ours[:k] == theirs[:k]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini", help="'mini' or a preset name for a random model (e.g. 1B)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates exactly --max-tokens")
    ap.add_argument("--rounds", type=int, default=3, help="alternating engine/transformers rounds (medians)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--kv-cache-gb", type=float, default=4.0, help="the engine's KV cache")
    ap.add_argument("--compile", action="store_true", help="the engine decodes through torch.compile "
                    "(`internvl35 serve --compile`); compiled before timing, as the server does at start-up")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: both systems there, in the engine's default "
                    "dtype (fp32 on the CPU, bf16 on a GPU)")
    ap.add_argument("--pack-weights", action="store_true", help="the engine's LLM keeps packed weights for "
                    "batched decode steps (`internvl35 serve --pack-weights`)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the CLI does; the same for both systems in this process
    from transformers import InternVLForConditionalGeneration

    tmp = Path(tempfile.mkdtemp())
    ours_dir, hf_dir = checkpoint_dirs(args.model, tmp)
    cm = internvl35.load(ours_dir, compile=args.compile, pack_weights=args.pack_weights, device=args.device)
    t = time.perf_counter()
    LLMEngine(cm, EngineConfig(kv_cache_bytes=2**28)).warmup()
    if args.compile:
        print(f"engine decode step compiled in {time.perf_counter() - t:.1f} s", flush=True)
    hf = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=cm.dtype).eval().to(cm.device)
    prompts = workload(cm, args.n)
    tiles = sum(sum(p.tiles_per_image) for p in prompts)
    limit = f"exactly {args.max_tokens}" if args.ignore_eos else f"up to {args.max_tokens} (stop at EOS)"
    print(f"{args.model}: {args.n} requests, {tiles} tiles, {sum(len(p.input_ids) for p in prompts)} prompt "
          f"tokens, {limit} output tokens each, {args.device} ({cm.dtype}), {args.threads} threads, engine "
          f"{'compiled' if args.compile else 'eager'}{', packed weights' if args.pack_weights else ''}", flush=True)
    rows = {}
    for c in args.concurrency:
        # alternating rounds, medians: this machine's speed drifts by tens of percent within minutes
        rounds = []
        for _ in range(args.rounds):
            ours, ours_out = run_engine(cm, prompts, c, args.max_tokens, args.ignore_eos, args.kv_cache_gb)
            theirs, hf_out = run_transformers(hf, cm.tokenizer.pad_id, cm.tokenizer.im_end_id, prompts, c,
                                              args.max_tokens, args.ignore_eos)
            rounds.append((ours, theirs))
        same = sum(agree(a, b, cm.stop_ids) for a, b in zip(ours_out, hf_out))
        ours, theirs = (median_row([r[i] for r in rounds]) for i in (0, 1))
        ratios = [a["req_s"] / b["req_s"] for a, b in rounds]
        rows[c] = {"internvl35": ours, "transformers": theirs, "throughput_ratio": statistics.median_high(ratios),
                   "ratio_per_round": [round(r, 3) for r in sorted(ratios)], "identical_outputs": f"{same}/{len(prompts)}"}
        print(f"concurrency {c:>3}: engine {ours['req_s']:.3g} req/s (TTFT {ours['ttft_s']:.3f} s, "
              f"TPOT {ours['tpot_s'] * 1e3:.1f} ms) | transformers {theirs['req_s']:.3g} req/s "
              f"(TTFT {theirs['ttft_s']:.3f} s, TPOT {theirs['tpot_s'] * 1e3:.1f} ms) | "
              f"ratio {rows[c]['throughput_ratio']:.2f}x (rounds {rows[c]['ratio_per_round']}) | "
              f"identical outputs {same}/{len(prompts)}", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
