"""Core inference benchmark: internvl35 vs transformers on the same random 1B-shaped fp32 model (CPU).

Prints prefill (one 448px tile + text) and decode tokens/s for both (ours eager, with the
torch.compile decode step and with the native C step), side by side, the machine's fp32 matmul peak and memory bandwidth
measured in the same run, the fraction of each bound reached (prefill: its matmul FLOPs over the
peak measured around it; decode: the weights and the K/V cache a token reads over the bandwidth
sampled right after each step; the compiled and the native step read bf16 copies of the
bf16-valued weights, so their bound counts 2 bytes per weight, the others 4), and the peak RSS of
`internvl35.load` relative to the model's size in memory.

    .venv/bin/python benchmarks/bench_core.py [--preset 1B] [--decode-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import internvl35
from internvl35.hardware import best_of, matmul_peak_flops, reuse_freed_memory
from internvl35.config import get_config
from internvl35.data.tokenizer import train_bpe
from internvl35.generate import generate_stream
from internvl35.models.internvl import InternVLModel
from internvl35.sampling import SamplingParams
from internvl35.weights.convert import write_checkpoint


def prefill_flops(cfg, n_text: int) -> float:
    """Matmul FLOPs of one prefill: ViT over 1025 tokens, projector, LLM over the prompt, one head row."""
    v, t = cfg.vision, cfg.text
    P = v.grid**2 + 1
    vit = v.num_layers * 2 * P * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vit += v.num_layers * 4 * P * P * v.hidden_size  # attention scores and values
    w = 4 * v.hidden_size
    proj = 2 * cfg.num_image_token * (w * t.hidden_size + t.hidden_size**2)
    L = n_text
    qkvo = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    llm = t.num_layers * 2 * L * (qkvo + 3 * t.hidden_size * t.intermediate_size)
    llm += t.num_layers * 4 * L * L * t.num_heads * t.head_dim / 2  # causal attention
    return vit + proj + llm + 2 * t.hidden_size * t.vocab_size


def random_model(preset: str) -> tuple[InternVLModel, object]:
    """A random model of a real size (built on meta, filled with N(0, 0.02)) and a small tokenizer."""
    tok = train_bpe(["What is in this image? Describe it in detail please."] * 10, 400)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = InternVLModel(get_config(preset))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model, tok


def decode_bytes(model: InternVLModel, context: float, weight_bytes: int = 4) -> float:
    """Bytes one decode step must read: every LLM weight except the embedding table, at `weight_bytes`
    per value (4: fp32; 2: the bf16 copies compiled single-sequence steps read), and the K/V cache of
    `context` tokens (fp32, as the model computes)."""
    lm, t = model.language_model, model.cfg.text
    n = sum(p.numel() for n_, p in lm.named_parameters() if "embed_tokens" not in n_)
    if lm.tied:
        n += lm.model.embed_tokens.weight.numel()
    return n * weight_bytes + 2 * t.num_layers * t.num_kv_heads * t.head_dim * context * 4


class StepTimer:
    """Times decode steps (`start` / `stop` around each, or as a transformers streamer) and samples
    the read bandwidth right after every step, outside the timed span."""

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe, self.times, self.bandwidths = probe, [], []
        self.mark, self.calls = 0.0, 0

    def start(self) -> None:
        self.mark = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self.mark)
        t = time.perf_counter()
        self.probe.sum()
        self.bandwidths.append(self.probe.numel() * 4 / (time.perf_counter() - t))
        self.start()

    def put(self, _value) -> None:  # transformers streamer: the prompt, the prefill's token, then one per step
        self.calls += 1
        if self.calls == 2:
            self.start()
        elif self.calls > 2:
            self.stop()

    def end(self) -> None:
        pass

    @property
    def tokens_per_s(self) -> float:
        return len(self.times) / sum(self.times)

    def fraction(self, nbytes: float) -> float:
        """Median over steps of (bytes / step time) / the bandwidth sampled right after the step."""
        return statistics.median(nbytes / t / b for t, b in zip(self.times, self.bandwidths))


def measure_load_rss(path: Path, compile: bool = False) -> dict:
    """Peak RSS of `internvl35.load` (with `compile`: and its bf16 copies) in a fresh process. VmHWM
    belongs to the process's own address space (getrusage's ru_maxrss would include the parent's
    peak, inherited across fork/exec)."""
    code = ("import re, internvl35\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
            "base = hwm()\n"
            f"m = internvl35.load(r'{path}', compile={compile})\n"
            "size = sum(p.numel() * p.element_size() for p in m.model.parameters())\n"
            "print(base, hwm(), size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak, size = map(int, out)
    return {"rss_base": base, "rss_peak": peak, "weights": size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1B")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the CLI does; the same for both systems in this process
    from transformers import InternVLForConditionalGeneration

    cfg = get_config(args.preset)
    print(f"building random {args.preset}-shaped model ({args.threads} threads) ...", flush=True)
    ours_model, tok = random_model(args.preset)
    tmp = Path(tempfile.mkdtemp())
    write_checkpoint(ours_model, tok, tmp / "ckpt", "hf", torch.bfloat16)
    del ours_model
    rss = measure_load_rss(tmp / "ckpt")
    rss_compile = measure_load_rss(tmp / "ckpt", compile=True)
    ours = internvl35.load(tmp / "ckpt", compile=True)  # compiled steps read bf16 copies (bf16 storage)
    halves = ours.model.language_model.head_half is not None
    hf = InternVLForConditionalGeneration.from_pretrained(tmp / "ckpt", dtype=torch.float32).eval()
    from PIL import Image
    img = Image.new("RGB", (448, 448), (120, 30, 200))
    prompt = ours.build_prompt("What is in this image? Describe it in detail please.", [img], max_tiles=1)
    ids, pv = torch.tensor([prompt.input_ids]), prompt.pixel_values
    L = ids.shape[1]

    flops = prefill_flops(cfg, L)

    @torch.inference_mode()
    def prefill(system: str) -> float:
        if system == "ours":
            return L / best_of(lambda: ours.model(ids, pv, last_only=True), 1)
        return L / best_of(lambda: hf(input_ids=ids, pixel_values=pv, logits_to_keep=1), 1)

    n = args.decode_tokens
    params = SamplingParams(max_new_tokens=n + 1)
    feats, _ = ours.model.encode_images(pv)

    # what each system's step reads, at the mean context over the decoded tokens
    nbytes = decode_bytes(ours.model, L + n / 2)
    step_bytes = {"eager": nbytes, "compiled": decode_bytes(ours.model, L + n / 2, 2 if halves else 4),
                  "transformers": nbytes}
    step_bytes["native"] = step_bytes["compiled"]  # the same bf16 copies, read by the C step
    probe = torch.ones(512 * 2**20 // 4)  # a bandwidth sample after every decode step (~15 ms)

    def ours_decode(compile: bool, native: bool = False) -> StepTimer:
        timer = StepTimer(probe)
        it = generate_stream(ours.model, [prompt.input_ids], params, set(), feats, compile=compile, native=native)
        next(it)  # the prefill
        for _ in range(n):
            timer.start()
            next(it)
            timer.stop()
        return timer

    def hf_decode() -> StepTimer:
        timer = StepTimer(probe)
        with torch.inference_mode():
            hf.generate(input_ids=ids, pixel_values=pv, max_new_tokens=n + 1, do_sample=False, min_new_tokens=n + 1,
                        streamer=timer)
        return timer

    t = time.perf_counter()
    ours_decode(True)  # compiles the step
    compile_s = time.perf_counter() - t
    # This machine's bandwidth and matmul rate drift by up to 30% within minutes and switch between
    # a slow and a fast regime within seconds (a shared memory system). So each round measures the
    # matmul rate right before and after its prefills (the two systems in alternating order), and
    # every decode step is set against a bandwidth sample taken right after it: a step's fraction
    # is the bytes it read over its time, over that sample. Medians over steps, then over rounds.
    rounds = []
    for i in range(args.rounds):
        peak0 = matmul_peak_flops()
        r = {s: prefill(s) for s in (("ours", "hf") if i % 2 == 0 else ("hf", "ours"))}
        r["prefill_bound"] = (peak0 + matmul_peak_flops()) / 2 / flops * L
        timers = {"eager": ours_decode(False), "compiled": ours_decode(True), "native": ours_decode(True, True),
                  "transformers": hf_decode()}
        r |= {k: t.tokens_per_s for k, t in timers.items()}
        r |= {f"{k}_frac": t.fraction(step_bytes[k]) for k, t in timers.items()}
        bandwidth = statistics.median(b for t in timers.values() for b in t.bandwidths)
        r["bound"], r["bound_compiled"] = bandwidth / nbytes, bandwidth / step_bytes["compiled"]
        rounds.append(r)
        print({k: round(v, 2) for k, v in r.items()}, flush=True)

    def med(num: str, den: str | None = None) -> float:
        return statistics.median(r[num] / (r[den] if den else 1.0) for r in rounds)

    names = ("eager", "compiled", "native", "transformers")
    d = {k: med(k) for k in names + ("bound", "bound_compiled", "prefill_bound")}
    frac = {k: med(f"{k}_frac") for k in names}
    res = {
        "prompt_tokens": L, "matmul_peak_gflops": d["prefill_bound"] * flops / L / 1e9,
        "bandwidth_gbs": d["bound"] * nbytes / 1e9,
        "prefill_tok_s": {"internvl35": med("ours"), "transformers": med("hf"), "matmul_bound": med("prefill_bound")},
        "prefill_frac_of_peak": {"internvl35": med("ours", "prefill_bound"), "transformers": med("hf", "prefill_bound")},
        "decode_tok_s": {"internvl35": d["eager"], "internvl35_compiled": d["compiled"],
                         "internvl35_native": d["native"], "transformers": d["transformers"],
                         "bandwidth_bound": d["bound"],
                         "bandwidth_bound_compiled": d["bound_compiled"]},
        "decode_frac_of_bound": {"internvl35": frac["eager"], "internvl35_compiled": frac["compiled"],
                                 "internvl35_native": frac["native"], "transformers": frac["transformers"]},
        "decode_compile_s": compile_s,
        "speedup": {"prefill": med("ours", "hf"), "decode": med("eager", "transformers"),
                    "decode_compiled": med("compiled", "transformers"),
                    "decode_native": med("native", "transformers")},
        "load_rss_over_weights": rss["rss_peak"] / rss["weights"],
        "load_rss_minus_import_over_weights": (rss["rss_peak"] - rss["rss_base"]) / rss["weights"],
        "load_compile_rss_over_weights": rss_compile["rss_peak"] / rss["weights"],  # + the bf16 copies
        "weights_gb": rss["weights"] / 1e9,
        "decode_gb_per_token": {"fp32": nbytes / 1e9, "compiled": step_bytes["compiled"] / 1e9},
        "compiled_reads_bf16_copies": halves,
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
