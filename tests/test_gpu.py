"""The same checks on a CUDA GPU (skipped where there is none): parity with transformers on the GPU,
the GPU's bf16 default against the CPU's fp32, the engine against `chat`, training (the loop,
the dense stage and data workers), and the coupled and decoupled servers on the GPU."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import internvl35
from internvl35.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("text,vision", [("qwen3", "300m"), ("qwen3_moe", "300m"), ("qwen3", "6b")])
def test_logits_match_transformers_on_gpu(tmp_path, tokenizer, image, text, vision):
    from tests.parity.hf_tiny import make_hf_model, save_hf

    hf = make_hf_model(tokenizer, text, vision)
    ours = internvl35.load(save_hf(hf, tokenizer, tmp_path / "hf"), dtype=torch.float32, device="cuda")
    prompt = ours.build_prompt("Describe the image.", [image], max_tiles=4)
    ids, pv = torch.tensor([prompt.input_ids], device="cuda"), prompt.pixel_values.cuda()
    with torch.no_grad():
        ref = hf.cuda()(input_ids=ids, pixel_values=pv).logits
    got = ours(ids, pixel_values=pv)
    assert got.device.type == "cuda" and (got - ref).abs().max().item() <= 1e-4


def test_gpu_bf16_default_and_fp32_answers_match_the_cpu(mini):
    from internvl35.data.world import generate

    fp32 = internvl35.load("mini", dtype=torch.float32, device="cuda")
    bf16 = internvl35.load("mini", device="cuda")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    samples = [generate(fam, 2**48 + 7 + i) for i, fam in enumerate(["attributes", "counting", "charts", "video"])]
    for s in samples:
        kw = {"video": s.images} if s.video else {"images": s.images}
        assert fp32.chat(s.question, max_new_tokens=24, **kw) == mini.chat(s.question, max_new_tokens=24, **kw)
        prompt = mini.build_prompt(s.question, **kw)
        ids = torch.tensor([prompt.input_ids])
        ref = mini(ids, pixel_values=prompt.pixel_values)[0, -1]
        pv = None if prompt.pixel_values is None else prompt.pixel_values.cuda()
        low = bf16(ids.cuda(), pixel_values=pv)[0, -1].float().cpu()
        assert torch.cosine_similarity(low, ref, dim=0) > 0.995
        assert low.argmax() == ref.argmax()


@pytest.mark.parametrize("compile", [False, True])
def test_engine_on_gpu_equals_chat(compile):
    from internvl35.engine.llm_engine import EngineConfig, LLMEngine
    from tests.engine.test_engine import chat_ids, mixed_prompts

    cm = internvl35.load("mini", dtype=torch.float32, device="cuda", compile=compile)
    prompts = mixed_prompts(cm, 10)
    params = [SamplingParams(max_new_tokens=6 + 2 * (i % 4)) for i in range(len(prompts))]
    engine = LLMEngine(cm, EngineConfig(block_size=8))
    assert engine.generate(prompts, params) == [chat_ids(cm, p, sp) for p, sp in zip(prompts, params)]
    assert engine.block_manager.num_free == engine.num_blocks


def test_training_on_gpu_with_data_workers(tmp_path, tok_dir):
    from internvl35.train.config import load_config
    from internvl35.train.loop import train
    from tests.train.test_loop import _config, _losses, _metrics

    cfg = load_config(_config(tmp_path, tok_dir, 12, dense_steps=3, device="cuda", data_workers=2))
    final = train(cfg)
    losses = list(_losses(tmp_path / "run").values())
    assert len(losses) == 15
    lm = losses[3:]
    assert sum(lm[-3:]) / 3 < 0.8 * sum(lm[:3]) / 3
    assert all(0 < r["mfu"] < 1 for r in _metrics(tmp_path / "run"))
    trained = internvl35.load(final)  # the GPU-trained checkpoint loads on the CPU
    assert next(trained.model.parameters()).device.type == "cpu"


def test_servers_on_gpu_decoupled_equal_coupled(tmp_path):
    """The commands themselves: `serve-vision --device cuda` + `serve --device cuda --vision ...` answer
    exactly as `serve --device cuda` (the same bf16 features cross the wire, the same engine decodes)."""
    import openai

    from internvl35.data.world import generate
    from tests.serve.test_openai_server import data_url, free_port, user

    vision_port, dvd_port, coupled_port = free_port(), free_port(), free_port()
    cli = [sys.executable, "-m", "internvl35.cli"]
    named = ["--served-model-name", "mini"]
    commands = [["serve-vision", "--device", "cuda", "--bind", f"tcp://127.0.0.1:{vision_port}"],
                ["serve", "--device", "cuda", "--port", str(dvd_port), "--vision", f"tcp://127.0.0.1:{vision_port}",
                 *named],
                ["serve", "--device", "cuda", "--port", str(coupled_port), *named]]
    logs = [open(tmp_path / f"server{i}.log", "w") for i in range(3)]
    procs = [subprocess.Popen(cli + c, stdout=log, stderr=subprocess.STDOUT) for c, log in zip(commands, logs)]
    try:
        for port in (dvd_port, coupled_port):
            for _ in range(240):
                dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                assert not dead, (tmp_path / f"server{dead[0]}.log").read_text()[-3000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
        answers = {}
        for port in (dvd_port, coupled_port):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            answers[port] = []
            for i, fam in enumerate(["counting", "attributes", "charts"]):
                s = generate(fam, 2**48 + 40 + i)
                r = client.chat.completions.create(model="mini", messages=user(s.question, data_url(s.images[0])),
                                                   max_tokens=12)
                answers[port].append(r.choices[0].message.content)
        assert all(answers[dvd_port]) and answers[dvd_port] == answers[coupled_port]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for log in logs:
            log.close()
