"""Decoupled Vision-Language Deployment benchmark: the paper's Table 18 in miniature.

Request throughput of coupled serving vs DvD (vision server + language server) vs DvD + the Flash
router, for a vision-heavy workload (one distinct multi-tile image per request, short outputs), all
measured side by side in one run with real servers and a real HTTP client (`--n` timed requests per
mode, each image distinct, after `--concurrency` untimed ones that warm the servers up):

  (a) added hardware, as in the paper: coupled on one core vs vision on one core + language on the other
  (b) equal hardware: coupled on both cores vs the same 1 + 1 split

Per-stage times (preprocessing, vision, LLM, transfer) are measured in-process on one thread, the
requests in groups of `--concurrency` as the servers see them, right before each mode runs, and
give the ideal pipeline bound 1 / max(stage time per core) that the mode is compared with. In DvD,
images are decoded and tiled on the vision server (`tile`; the language server decodes the data URL,
reads each image's header and tokenizes, `probe`, and sends the file) or, with `--preprocess
language`, on the language server (all of it, `preprocess`; float32 tiles travel); the bounds of both
placements are reported.
Two models: `mini` and `vit-heavy`, a random model whose vision/LLM cost per tile is about the
38B's (0.75; `vision_over_llm_per_tile` in the output, 0.65-0.67 on 2 EPYC cores); `--models` picks.

    .venv/bin/python benchmarks/bench_dvd.py [--models mini vit-heavy] [--n 48] [--concurrency 8] [--rounds 1] [--max-tiles 6] [--compile] [--pack-weights] [--preprocess language]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import internvl35
from internvl35.config import MINI_TEXT, get_config
from internvl35.data.world import Style
from internvl35.data.world.render import canvas, draw_shape
from internvl35.engine.llm_engine import LLMEngine
from internvl35.models.internvl import InternVLModel
from internvl35.sampling import SamplingParams
from internvl35.serve.transport import pack, unpack
from internvl35.serve.vision_client import PREPROCESS
from internvl35.weights.convert import write_checkpoint

# The router at the paper's operating point, about half the visual tokens removed: of a request's 7
# tiles (--max-tiles 6) the 5 the router ranks most compressible go to 1/4 of their tokens (112 -> 52 visual tokens).
FLASH = {"flash": True, "flash_relative_threshold": 0.3, "flash_absolute_threshold": 0.0}


def vit_heavy_checkpoint(out: Path) -> Path:
    """Mini's vision tower with a larger LLM: ViT / LLM-prefill time per tile near the 38B's 0.75."""
    cm = internvl35.load("mini")
    text = replace(MINI_TEXT, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                   intermediate_size=1536)
    cfg = replace(get_config("mini"), name="vit-heavy", text=text)
    torch.manual_seed(0)
    model = InternVLModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    write_checkpoint(model, cm.tokenizer, out, "custom", torch.bfloat16)
    return out


def images(n: int) -> list[str]:
    """n distinct 336x224 scenes as data URLs (mini's 112 px tiles, --max-tiles 6: 6 tiles + thumbnail)."""
    import random

    urls = []
    for i in range(n):
        rng = random.Random(i)
        img = canvas(336, 224, rng, Style())
        for _ in range(6):
            s = rng.randint(20, 44)
            x, y = rng.randint(0, 336 - s), rng.randint(0, 224 - s)
            draw_shape(img, rng.choice(["circle", "square", "triangle", "star"]),
                       rng.choice(["red", "green", "blue", "yellow"]), (x, y, x + s, y + s), rng, Style())
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cores: set[int]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cores))}
    return subprocess.Popen([sys.executable, "-m", "internvl35.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load_test(port: int, urls: list[str], warm: list[str], conc: int, tokens: int, extra: dict,
                    servers: dict[str, int]) -> dict:
    """`urls` timed at `conc` requests in flight, after `warm` (other images) went through untimed: a
    server builds a product kernel for each new shape on first use (1-5 ms each), a start-up cost
    that a long-running server has behind it."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                timeout=600)
    for _ in range(600):  # wait until the server (and its vision server) answers
        try:
            await client.chat.completions.create(model="m", max_tokens=1, extra_body=extra, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": warm[0]}},
                                             {"type": "text", "text": "Describe the image."}]}])
            break
        except Exception:  # noqa: BLE001 - still starting
            await asyncio.sleep(0.2)
    sem = asyncio.Semaphore(conc)
    latencies = []

    async def one(url: str, timed: bool = True) -> None:
        async with sem:
            t = time.perf_counter()
            await client.chat.completions.create(model="m", max_tokens=tokens, extra_body={**extra, "ignore_eos": True},
                                                 messages=[{"role": "user", "content": [
                                                     {"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "Describe the image."}]}])
            if timed:
                latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(one(u, timed=False) for u in warm))

    # CPU time per request of each server and of this client: on 2 cores the client shares the
    # serving cores (with coupled serving on one core it has the other to itself)
    cpu0 = {k: cpu_seconds(pid) for k, pid in servers.items()}
    c0 = time.process_time()
    m0 = engine_counts(port)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(u) for u in urls))
    total = time.perf_counter() - t0
    n = len(latencies)
    cpu = {k: round((cpu_seconds(pid) - cpu0[k]) / n, 5) for k, pid in servers.items()}
    cpu["client"] = round((time.process_time() - c0) / n, 5)
    m1 = engine_counts(port)
    await client.close()
    # new tokens per LLM step: how large the decode batches were (steps of small batches cost
    # nearly as much as large ones, so this tells how efficiently the LLM side ran)
    per_step = (m1["generation_tokens"] - m0["generation_tokens"]) / max(m1["steps"] - m0["steps"], 1)
    return {"req_s": n / total, "latency_s": sum(latencies) / n, "cpu_s_per_request": cpu,
            "tokens_per_llm_step": round(per_step, 2)}


def engine_counts(port: int) -> dict[str, float]:
    """The serving engine's step and generated-token counters, from its Prometheus /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = dict(line.split()[:2] for line in text.splitlines() if line.startswith("internvl35_"))
    return {"steps": float(values["internvl35_engine_steps_total"]),
            "generation_tokens": float(values["internvl35_generation_tokens_total"])}


def run_mode(ckpt: Path, mode: str, cores: tuple[set[int], set[int]], urls, warm, conc, tokens, max_tiles,
             flags: list[str] = (), preprocess: str = "vision", client_cores: set[int] | None = None) -> dict:
    """`flags`: of the language side (`--compile`, `--pack-weights`), the same for every mode;
    `preprocess`: the side that decodes and tiles images in DvD; `client_cores`: where this process
    (the HTTP client) runs in DvD, where both cores serve (default: the language server's)."""
    port, procs = free_port(), []
    try:
        if mode == "coupled":
            procs.append(launch(["serve", "--model", str(ckpt), "--port", str(port), "--served-model-name", "m",
                                 "--threads", str(len(cores[0])), *flags], cores[0]))
        else:
            vport = free_port()
            procs.append(launch(["serve-vision", "--model", str(ckpt), "--bind", f"tcp://127.0.0.1:{vport}",
                                 "--threads", "1"], cores[1]))
            procs.append(launch(["serve", "--model", str(ckpt), "--port", str(port), "--served-model-name", "m",
                                 "--threads", "1", "--vision", f"tcp://127.0.0.1:{vport}",
                                 "--preprocess", preprocess, *flags], cores[0]))
        extra = {**(FLASH if mode.endswith("router") else {}), "max_tiles": max_tiles}
        names = ["server"] if mode == "coupled" else ["vision", "language"]
        # The client (this process) has a core to itself only beside coupled serving on one core. In DvD
        # both cores serve and it shares one (2-3 ms of CPU per request, where a remote client would cost
        # nothing): `client_cores`, which `run_round` sets to the core with less work per request.
        mine = os.sched_getaffinity(0)
        if mode != "coupled":
            os.sched_setaffinity(0, client_cores or cores[0])
        try:
            pids = {k: p.pid for k, p in zip(names, procs)}
            return asyncio.run(load_test(port, urls, warm, conc, tokens, extra, pids))
        finally:
            os.sched_setaffinity(0, mine)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


def stage_times(cm, urls: list[str], conc: int, tokens: int, max_tiles: int) -> dict:
    """Seconds per request of each stage on one thread (+ transfer), with and without the router."""
    from internvl35.data.image import load_image
    from internvl35.serve.media import MediaLimits, fetch_encoded, fetch_image

    torch.set_num_threads(1)
    # twice the concurrency (at least 16): the LLM stage runs in groups as large as the servers see, and
    # a moment of slowness on this machine weighs less in the bound than over fewer requests
    urls = urls[:max(16, 2 * conc)]
    t = time.perf_counter()
    files = [fetch_encoded(u, MediaLimits()) for u in urls]
    for f in files:
        cm.build_prompt("Describe the image.", [f], max_tiles=max_tiles, decode_images=False)
    probe = (time.perf_counter() - t) / len(urls)
    t = time.perf_counter()  # what a vision server does with a file: decode and tile
    for f in files:
        cm.image_tiles([load_image(f.data)], max_tiles)
    tile = (time.perf_counter() - t) / len(urls)
    t = time.perf_counter()
    prompts = [cm.build_prompt("Describe the image.", [fetch_image(u, MediaLimits())], max_tiles=max_tiles)
               for u in urls]
    pre = (time.perf_counter() - t) / len(urls)
    out = {"probe": probe, "tile": tile, "preprocess": pre}
    router = (FLASH["flash_relative_threshold"], FLASH["flash_absolute_threshold"])
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    for name, flash in (("", None), ("_router", router)):
        engine = LLMEngine(cm)
        t = time.perf_counter()  # the servers encode the requests that arrive together in one pass
        encoded = [e for b in range(0, len(prompts), conc)
                   for e in engine.encode_batch([(p, flash) for p in prompts[b:b + conc]])]
        out[f"vision{name}"] = (time.perf_counter() - t) / len(urls)
        out[f"llm{name}"] = llm_time(cm, encoded, conc, params)
        out[f"visual_tokens{name}"] = sum(e.features.shape[0] for e in encoded) / len(urls)
    # the same requests with each image as one tile: the LLM's work on the other tiles' tokens is the
    # difference (the same text and the same prefix sharing; identical text-only prompts would share
    # their question's blocks, which the image requests compute)
    one_tile = [cm.build_prompt("Describe the image.", [fetch_image(u, MediaLimits())], max_tiles=1) for u in urls]
    out["llm_one_tile"] = llm_time(cm, LLMEngine(cm).encode_batch([(p, None) for p in one_tile]), conc, params)
    out["tiles"] = sum(p.pixel_values.shape[0] for p in prompts) / len(prompts)
    # what crosses the wire: the image file (tiled by the vision server) or float32 tiles (tiled by
    # the language server), and the bf16 features back
    for key, sent in (("", [torch.frombuffer(bytearray(f.data), dtype=torch.uint8) for f in files]),
                      ("_tiles", [p.pixel_values.float() for p in prompts])):
        payloads = [(a, e.features.to(torch.bfloat16)) for a, e in zip(sent, encoded)]
        out[f"transfer{key}"] = transfer_time(payloads)
        out[f"transfer{key}_bytes"] = sum(a.nbytes + b.nbytes for a, b in payloads) / len(payloads)
    return out


def llm_time(cm, prompts: list, conc: int, params: SamplingParams) -> float:
    """Seconds per request of the LLM (prefill and decode) over `prompts`, `conc` at a time."""
    engine = LLMEngine(cm)
    t = time.perf_counter()
    for b in range(0, len(prompts), conc):
        engine.generate(prompts[b:b + conc], params)
    return (time.perf_counter() - t) / len(prompts)


def transfer_time(payloads: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds per request to move the image file out and the features back over ZeroMQ on loopback
    (an echo peer on its own thread answers each request with a features-sized message)."""
    import threading

    import zmq

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")

    def echo() -> None:
        for _, feats in payloads:
            frames = router.recv_multipart(copy=False)
            unpack(frames[1:])
            router.send_multipart([frames[0], *pack({"type": "features", "id": "x", "tokens_per_tile": [1]},
                                                    [feats])], copy=False)

    th = threading.Thread(target=echo)
    th.start()
    t = time.perf_counter()
    for data, _ in payloads:
        dealer.send_multipart(pack({"type": "encode_files", "id": "x", "tiles_per_image": [1], "max_tiles": 1},
                                   [data]), copy=False)
        unpack(dealer.recv_multipart(copy=False))
    took = (time.perf_counter() - t) / len(payloads)
    th.join()
    router.close(0)
    dealer.close(0)
    ctx.term()
    return took


def placement_costs(st: dict, side: str) -> tuple[float, float, float]:
    """Seconds per request of (transfer, preprocessing on the vision core, on the language core) with
    images decoded and tiled on `side`."""
    if side == "vision":  # the file travels; the language side decodes the URL, reads the header, tokenizes
        return st["transfer"], st["tile"], st["probe"]
    return st["transfer_tiles"], 0.0, st["preprocess"]  # float32 tiles travel


def core_loads(st: dict, side: str, router: bool) -> tuple[float, float]:
    """Seconds per request of (the vision core, the language core) in DvD, with or without the router."""
    x, vis_pre, lang_pre = placement_costs(st, side)
    v, llm = (st["vision_router"], st["llm_router"]) if router else (st["vision"], st["llm"])
    return vis_pre + v + x, lang_pre + llm + x


def ideal_req_s(st: dict, side: str = "vision") -> dict:
    """The pipeline bound of each mode from per-stage seconds per request; DvD with images decoded and
    tiled on `side` (the language core always prefills and decodes)."""
    return {"coupled_1core": 1 / (st["preprocess"] + st["vision"] + st["llm"]),
            "dvd": 1 / max(core_loads(st, side, False)), "dvd_router": 1 / max(core_loads(st, side, True))}


def round_summary(sts: dict[str, dict], res: dict, side: str) -> dict:
    """One round, DvD preprocessing on `side`. `sts`: stage times measured right before each mode ran
    (this machine's speed drifts by up to 2x within minutes, so each mode is compared with the bound
    measured next to it)."""
    st = {k: statistics.median_high(s[k] for s in sts.values()) for k in next(iter(sts.values()))}
    v, llm = st["vision"], st["llm"]
    _, vis_pre, lang_pre = placement_costs(st, side)
    ideal = {mode: ideal_req_s(sts[mode], side)[mode] for mode in ("coupled_1core", "dvd", "dvd_router")}
    transfer = {mode: placement_costs(sts[mode], side)[0] for mode in ("dvd", "dvd_router")}
    a = {"coupled_1core": res["coupled_1core"]["req_s"], "dvd": res["dvd"]["req_s"],
         "dvd_router": res["dvd_router"]["req_s"]}
    lines = {
        "stage_s_per_request (median)": {k: round(val, 5) for k, val in st.items()},
        "vision_s_per_request_by_mode": {k: round(val["vision"], 5) for k, val in sts.items()},
        "vision_over_llm": round(v / llm, 3),
        # per tile, the ViT and projector vs the LLM's work on the tile's tokens (the 38B's 0.75 is this ratio)
        "vision_over_llm_per_tile": round(v / st["tiles"] / ((llm - st["llm_one_tile"]) / (st["tiles"] - 1)), 3),
        # per request in DvD: the vision core's work (ViT, projector, decoding and tiling if placed there) vs the
        # language core's (LLM prefill and decode, the rest of the preprocessing)
        "vision_core_over_language_core": round((vis_pre + v) / (lang_pre + llm), 3),
        "preprocess_side": side,
        "ideal_req_s": {k: round(val, 3) for k, val in ideal.items()},
        "ideal_req_s_by_preprocess_side": {side: {k: round(ideal_req_s(sts[k], side)[k], 3) for k in ("dvd", "dvd_router")}
                                           for side in PREPROCESS},
        "measured_req_s": {**{k: round(val, 3) for k, val in a.items()},
                           "coupled_2cores": round(res["coupled_2cores"]["req_s"], 3)},
        "fraction_of_ideal": {k: round(a[k] / ideal[k], 3) for k in a},
        "a_added_hardware": {"dvd_over_coupled": round(a["dvd"] / a["coupled_1core"], 3),
                             "dvd_router_over_coupled": round(a["dvd_router"] / a["coupled_1core"], 3)},
        "b_equal_hardware": {"dvd_over_coupled": round(a["dvd"] / res["coupled_2cores"]["req_s"], 3),
                             "dvd_router_over_coupled": round(a["dvd_router"] / res["coupled_2cores"]["req_s"], 3)},
        "transfer_share_of_latency": {k: round(transfer[k] / res[k]["latency_s"], 4) for k in transfer},
        "latency_s": {k: round(r["latency_s"], 3) for k, r in res.items()},
        "cpu_s_per_request": {k: r["cpu_s_per_request"] for k, r in res.items()},
        "tokens_per_llm_step": {k: r["tokens_per_llm_step"] for k, r in res.items()},
        "client_core": {k: r["client_core"] for k, r in res.items() if "client_core" in r},
    }
    return lines


HEADLINE = ("measured_req_s", "fraction_of_ideal", "a_added_hardware", "b_equal_hardware")


def report(name: str, rounds: list[dict]) -> dict:
    """Every round in full, then the headline figures per round and their medians."""
    for i, r in enumerate(rounds):
        print(f"== {name}, round {i + 1} ==\n{json.dumps(r, indent=2)}", flush=True)
    heads = {sec: {k: [r[sec][k] for r in rounds] for k in rounds[0][sec]} for sec in HEADLINE}
    medians = {sec: {k: round(statistics.median(v), 3) for k, v in d.items()} for sec, d in heads.items()}
    print(f"== {name}: per round ==\n{json.dumps(heads)}\n== {name}: medians over {len(rounds)} rounds ==\n"
          f"{json.dumps(medians, indent=2)}", flush=True)
    return {"rounds": rounds, "medians": medians}


def run_round(ckpt: Path, cm, modes: dict, urls: list[str], warm: list[str], args) -> dict:
    """Every mode once, each right after its stage times."""
    sts, res = {}, {}
    for key, (mode, cores) in modes.items():
        sts[key] = stage_times(cm, urls, args.concurrency, args.max_tokens, args.max_tiles)
        vision_core, language_core = core_loads(sts[key], args.preprocess, mode.endswith("router"))
        client = "vision" if vision_core < language_core else "language"  # the lighter core
        res[key] = run_mode(ckpt, mode, cores, urls, warm, args.concurrency, args.max_tokens, args.max_tiles,
                            ["--compile"] * args.compile + ["--pack-weights"] * args.pack_weights,
                            args.preprocess, cores[1] if client == "vision" else cores[0])
        if mode != "coupled":
            res[key]["client_core"] = client
    return round_summary(sts, res, args.preprocess)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["vit-heavy", "mini"])
    ap.add_argument("--n", type=int, default=48, help="timed requests per mode, after --concurrency untimed ones "
                    "(throughput includes filling and draining the pipeline: use several times --concurrency)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all four modes (medians reported)")
    ap.add_argument("--compile", action="store_true", help="servers and stage times decode through torch.compile")
    ap.add_argument("--pack-weights", action="store_true", help="servers and stage times decode with packed weights")
    ap.add_argument("--preprocess", choices=PREPROCESS, default="vision",
                    help="DvD: the side that decodes and tiles images (`serve --preprocess`)")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 CPU cores")
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]
    tmp = Path(tempfile.mkdtemp())
    urls = images(args.n + args.concurrency)
    urls, warm = urls[:args.n], urls[args.n:]  # timed; run first, untimed
    out = {}
    for name in args.models:
        ckpt = vit_heavy_checkpoint(tmp / name) if name == "vit-heavy" else internvl35.load(name).path
        modes = {"coupled_1core": ("coupled", ({c0}, {c0})), "coupled_2cores": ("coupled", ({c0, c1}, {c0, c1})),
                 "dvd": ("dvd", ({c0}, {c1})), "dvd_router": ("dvd_router", ({c0}, {c1}))}
        cm = internvl35.load(ckpt, compile=args.compile, pack_weights=args.pack_weights)
        torch.set_num_threads(1)  # as in `stage_times`: a compiled step keeps the thread count it saw
        LLMEngine(cm).warmup()  # compiles the decode steps (with --compile) before any timing
        out[name] = report(name, [run_round(ckpt, cm, modes, urls, warm, args) for _ in range(args.rounds)])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
