"""Special tokens, conversation templates and the <image> placeholder expansion (one module, so no
token string or template lives anywhere else). Token ids are never hard-coded: the tokenizer
resolves them."""

from __future__ import annotations

from dataclasses import dataclass

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
THINK_START, THINK_END = "<think>", "</think>"
# Every token InternVL adds to the Qwen3 vocabulary, in release order, plus ChatML's own.
INTERNVL_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GROUNDING_TOKENS = INTERNVL_TOKENS[3:]  # <quad> ... </box>: part of answers, so kept when decoding
SPECIAL_TOKENS = CHATML_TOKENS + INTERNVL_TOKENS[:3] + [VIDEO_PLACEHOLDER]
ADDED_TOKENS = GROUNDING_TOKENS + [THINK_START, THINK_END]  # ordinary added tokens: kept when decoding

DEFAULT_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                  "多模态大语言模型。")
# Thinking mode (R1 style), in our own words: reason inside <think></think>, then answer on its own.
THINKING_SYSTEM = (
    "You are an AI assistant that thinks before it answers. First work through the problem inside "
    "<think> and </think>: consider it from several angles, try candidate solutions and reason step by "
    "step. Then, after a newline, give a clear and concise final answer that stands on its own and "
    "does not refer back to the thinking.")


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # "{system}" is replaced by the system message
    user: str
    assistant: str
    sep: str  # ends every turn
    stop: str  # the token that ends generation
    default_system: str

    def render(self, question: str, history: list[tuple[str, str]] = (), system: str | None = None) -> str:
        """The prompt for `question` after `history` [(q, a), ...], ending with the assistant prefix."""
        sys = self.default_system if system is None else system
        parts = [self.system.format(system=sys) + self.sep]
        for q, a in history:
            parts.append(self.user + q + self.sep + self.assistant + a + self.sep)
        parts.append(self.user + question + self.sep + self.assistant)
        return "".join(parts)


TEMPLATES = {
    "internvl2_5": Template(
        name="internvl2_5", system="<|im_start|>system\n{system}", user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n", sep="<|im_end|>\n", stop="<|im_end|>",
        default_system=DEFAULT_SYSTEM),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def image_prefix(num_images: int, video: bool = False) -> str:
    """The placeholder lines put before the question: `<image>\\n`, `Image-k: <image>\\n`, `Framek: <image>\\n`."""
    if video:
        return "".join(f"Frame{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, num_images + 1))
    if num_images == 1:
        return IMAGE_PLACEHOLDER + "\n"
    return "".join(f"Image-{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, num_images + 1))


def attach_images(question: str, history: list[tuple[str, str]], count: int, video: bool = False) -> str:
    """Prefix the question with placeholder lines when neither it nor the history places the images."""
    placed = question.count(IMAGE_PLACEHOLDER) + sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history)
    if count and placed == 0:
        return image_prefix(count, video) + question
    if placed != count:
        raise ValueError(f"{placed} {IMAGE_PLACEHOLDER} placeholder(s) but {count} image(s)/frame(s)")
    return question


def expand_image_tokens(prompt: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Replace the k-th `<image>` by `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * tiles_k) + `</img>`."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != len(tiles_per_image):
        raise ValueError(f"prompt has {count} {IMAGE_PLACEHOLDER} placeholder(s) for {len(tiles_per_image)} image(s)")
    for n in tiles_per_image:
        span = IMG_START + IMG_CONTEXT * (tokens_per_tile * n) + IMG_END
        prompt = prompt.replace(IMAGE_PLACEHOLDER, span, 1)
    return prompt


def split_reasoning(text: str, partial: bool = False) -> tuple[str, str]:
    """A thinking-mode output -> (reasoning inside <think></think>, answer after it). With `partial`
    (a stream still running), text that may still become the closing tag is held back."""
    body = text.lstrip()
    if not body.startswith(THINK_START):
        if partial and THINK_START.startswith(body):
            return "", ""  # maybe the opening tag is still arriving
        return "", text
    body = body[len(THINK_START):]
    if THINK_END in body:
        reasoning, _, answer = body.partition(THINK_END)
        return reasoning.strip("\n"), answer.lstrip("\n")
    if partial:
        for k in range(len(THINK_END) - 1, 0, -1):
            if body.endswith(THINK_END[:k]):
                body = body[:-k]
                break
        return body.lstrip("\n"), ""
    return body.strip("\n"), ""
