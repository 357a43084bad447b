"""Command line: `internvl35 chat | serve | convert | info | train | eval` (thin: parses arguments)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from internvl35.errors import InternVLError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="InternVL3.5 in plain PyTorch.")
BF16_HELP = (" On CPU it keeps a bf16 copy of bf16-valued LLM weights, half their size, that single-sequence "
             "steps read.")
PACK_HELP = ("Keep a oneDNN-packed copy of the LLM weights for decode steps (CPU, fp32): faster batched "
             "decoding of 1B-sized and larger models, at the LLM's size in memory again.")
DEVICE_HELP = "cpu | cuda | cuda:N (bf16 weights on a GPU, fp32 on the CPU)."
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug
    from internvl35.hardware import reuse_freed_memory

    reuse_freed_memory()  # every command runs forward passes; see the function for the figures


def _run(fn: Callable[[], None]) -> None:
    """Run a command; our errors (and missing files) become one line on stderr and exit code 1."""
    try:
        fn()
    except (InternVLError, FileNotFoundError, ValueError) as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _answer(model, question: str, images: list[Path], video, history: list, stream: bool,
            **kw) -> str:
    pieces = model.stream_chat(question, images, video=video, history=history, **kw)
    if not stream:
        return "".join(pieces).strip()
    out = []
    for piece in pieces:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out).strip()


@app.command()
def chat(
    question: Optional[str] = typer.Argument(None, help="Question; omit for an interactive session."),
    model: str = typer.Option("mini", "--model", "-m", help="Checkpoint directory or 'mini'."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Image file (repeatable)."),
    video: Optional[Path] = typer.Option(None, "--video", help="Video file, GIF or folder of frames."),
    thinking: bool = typer.Option(False, "--thinking", help="Reason inside <think> first."),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="Max dynamic tiles per image."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    flash: Optional[bool] = typer.Option(None, "--flash/--no-flash", help="Flash router on/off (Flash models)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    compile: bool = typer.Option(False, "--compile", help="Decode faster. On CPU a dense LLM's steps run "
                                 "the native kernel (as without this flag) on a bf16 copy of bf16-valued LLM "
                                 "weights, half their size; elsewhere they run as one torch.compile graph "
                                 "(compiled once; pays off for long answers and interactive sessions)."),
    pack_weights: bool = typer.Option(False, "--pack-weights", help=PACK_HELP),
) -> None:
    """Chat about images or a video with an InternVL3.5 checkpoint."""

    def run() -> None:
        import internvl35
        from internvl35.data.template import attach_images
        from internvl35.data.video import load_frames

        m = internvl35.load(model, device=device, compile=compile, pack_weights=pack_weights)
        kw = dict(thinking=thinking, max_tiles=max_tiles, flash=flash, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, seed=seed)
        if question is not None:
            answer = _answer(m, question, image, video, [], stream, **kw)
            if not stream:
                typer.echo(answer)
            return
        history: list[tuple[str, str]] = []
        frames = load_frames(video) if video is not None else None  # decode once for all turns
        while True:  # interactive: the images stay attached to the first turn
            try:
                q = input("user> ").strip()
            except EOFError:
                break
            if q in ("exit", "quit"):
                break
            if not q:
                continue
            q = attach_images(q, history, len(frames) if frames else len(image), frames is not None)
            if not stream:
                typer.echo("assistant> ", nl=False)
            answer = _answer(m, q, image, frames, history, stream, **kw)
            if not stream:
                typer.echo(answer)
            history.append((q, answer))

    _run(run)


@app.command()
def serve(
    model: str = typer.Option("mini", "--model", "-m", help="Checkpoint directory or 'mini'."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    media_dir: Optional[Path] = typer.Option(None, "--media-dir", help="Allow file:// images under this folder."),
    max_images: int = typer.Option(8, "--max-images", help="Most images per request."),
    kv_cache_mb: int = typer.Option(512, "--kv-cache-mb", help="KV cache size."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Most sequences decoded together."),
    vision: list[str] = typer.Option([], "--vision", help="Vision server tcp://HOST:PORT (repeatable): "
                                     "decoupled deployment, only the LLM is loaded here."),
    vision_timeout: float = typer.Option(30.0, "--vision-timeout", help="Seconds to wait for a vision server."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the model."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="Model id clients use (default: the folder name)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode steps (compiled at start-up; "
                                 "faster steps for small batches)." + BF16_HELP),
    pack_weights: bool = typer.Option(False, "--pack-weights", help=PACK_HELP),
    preprocess: str = typer.Option("vision", "--preprocess", help="With --vision: where images are decoded and "
                                   "tiled, 'vision' (the server gets the file) or 'language' (here; float32 "
                                   "tiles travel: for busy vision servers on a fast network)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/models, /health, /metrics."""
    from internvl35.serve.server import run_server

    _run(lambda: run_server(model, host, port, media_dir, max_images, kv_cache_mb, max_num_seqs, vision,
                            vision_timeout, threads, served_model_name, compile=compile,
                            pack_weights=pack_weights, preprocess=preprocess, device=device))


@app.command("serve-vision")
def serve_vision(
    model: str = typer.Option("mini", "--model", "-m", help="Checkpoint directory or 'mini'."),
    bind: str = typer.Option("tcp://127.0.0.1:5555", "--bind", help="ZeroMQ endpoint to listen on."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the vision tower."),
    max_batch_tiles: Optional[int] = typer.Option(None, "--max-batch-tiles", help="Most tiles encoded in one pass "
                                                  "(default: about 1024 ViT tokens; a request never splits)."),
    decode_workers: int = typer.Option(2, "--decode-workers",
                                       help="Threads decoding and tiling image files while the ViT runs (0: inline)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Vision server for decoupled deployment: ViT + projectors + Flash router, features over TCP."""
    from internvl35.serve.vision_server import run_vision_server

    _run(lambda: run_vision_server(model, bind, threads, max_batch_tiles, decode_workers, device))


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Source checkpoint directory."),
    dst: Path = typer.Argument(..., help="Output directory (created)."),
    to: str = typer.Option(..., "--to", help="'hf' or 'custom'."),
) -> None:
    """Rewrite a checkpoint in the other format (config, weights, tokenizer)."""

    def run() -> None:
        from internvl35.weights.convert import convert as do_convert

        do_convert(src, dst, to)
        typer.echo(f"wrote {to} checkpoint to {dst}")

    _run(run)


@app.command()
def info(path: str = typer.Argument("mini", help="Checkpoint directory or 'mini'.")) -> None:
    """Size, format, parameter counts and dtype of a checkpoint (read from headers only)."""

    def run() -> None:
        from rich.console import Console
        from rich.table import Table

        from internvl35.weights.inspect import describe

        table = Table(show_header=False)
        for k, v in describe(path).items():
            table.add_row(k, str(v))
        Console().print(table)

    _run(run)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training YAML (see configs/)."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Override the config's out_dir."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in out_dir."),
) -> None:
    """Pre-train or fine-tune (resumes from out_dir/checkpoint when present)."""

    def run() -> None:
        from internvl35.train.config import load_config
        from internvl35.train.loop import train as do_train

        final = do_train(load_config(config, out_dir=out_dir), resume=not fresh)
        typer.echo(f"checkpoint: {final}")

    _run(run)


@app.command("eval")
def evaluate(
    model: str = typer.Option("mini", "--model", "-m", help="Checkpoint directory or 'mini'."),
    suite: str = typer.Option("mini", "--suite", help="mini | mini-alt"),
    n: int = typer.Option(100, "--n", help="Samples per task."),
    family: list[str] = typer.Option([], "--family", help="Only these families (repeatable)."),
    output: Optional[Path] = typer.Option(None, "--json", help="Write the report here."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Accuracy per task family on held-out samples of the mini world."""

    def run() -> None:
        import internvl35
        from internvl35.eval.runner import SUITES, print_table, run_suite, save_report

        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        report = run_suite(internvl35.load(model, device=device), suite, n, families=family or None)
        print_table(report)
        if output:
            save_report(report, output)

    _run(run)


if __name__ == "__main__":
    app()
