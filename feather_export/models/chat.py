"""The checkpoint's chat template, rendered once at export time (DESIGN §7).

Found where transformers' processor and tokenizer look for it, processor first:
``chat_template.jinja``, ``chat_template.json``, ``processor_config.json`` (``chat_template``), then
``tokenizer_config.json`` (``chat_template``: a string, or named templates of which ``default`` is
taken). It is rendered by transformers' own renderer for one user turn holding the image and a
placeholder question, with the generation prompt, and split at the placeholder into the text
before and after the question: a ``feather_runtime.prompt.PromptTemplate`` that the manifest stores
and the runtime fills without a template engine. No template: LLaVA-1.5's
``USER: <image>\\n{question} ASSISTANT:``.
"""
from __future__ import annotations

import json
from pathlib import Path

from feather_runtime.prompt import IMAGE_TOKEN, PromptTemplate

from feather_export.errors import FeatherError

PLACEHOLDER = "FEATHERQUESTIONPLACEHOLDER"

# Templates of the tiny family models, written in the form of the published llava-hf ones
# (LLaVA-1.5 style; ChatML as llava-interleave-qwen; [INST] with BOS in the text as Mistral).
TINY_CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ '\n' + content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "inst": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
}


def _token(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeatherError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FeatherError(f"{path} does not hold a JSON object")
    return data


def _named(template, where: str) -> str | None:
    """A template string, or the ``default`` one of a list of named templates."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise FeatherError(f"{where}: chat_template is neither a string nor named templates with a "
                       "'default' one")


def find_chat_template(directory: Path) -> tuple[str, str] | None:
    """(template, where it was found) in a checkpoint directory, or None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja.name
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            template = _named(_json(path).get("chat_template"), str(path))
            if template:
                return template, f"{name}:chat_template"
    return None


def special_tokens(directory: Path | None) -> dict[str, str]:
    """bos/eos/unk/pad tokens as tokenizer_config.json names them (the template's variables)."""
    path = None if directory is None else directory / "tokenizer_config.json"
    config = _json(path) if path is not None and path.is_file() else {}
    tokens = {key: _token(config.get(key)) for key in ("bos_token", "eos_token", "unk_token",
                                                       "pad_token")}
    return {k: v for k, v in tokens.items() if v is not None}


def render_template(template: str, source: str, tokens: dict[str, str],
                    image_token: str = IMAGE_TOKEN) -> PromptTemplate:
    """Render ``template`` for one user turn (image + placeholder question), generation prompt
    on, and split it at the question. Refuses a template that does not show the question and the
    image placeholder exactly once each."""
    from transformers.utils.chat_template_utils import render_jinja_template

    turns = ([{"type": "image"}, {"type": "text", "text": PLACEHOLDER}],   # processor style
             f"{image_token}\n{PLACEHOLDER}")                              # plain-text content
    rendered = None
    for content in turns:
        try:
            text, _ = render_jinja_template(
                conversations=[[{"role": "user", "content": content}]], chat_template=template,
                add_generation_prompt=True, **tokens)
        except Exception:  # noqa: BLE001 - a template that fails on this form: try the next
            continue
        text = text[0] if isinstance(text, list) else text
        if text.count(PLACEHOLDER) == 1 and text.count(image_token) == 1:
            rendered = text
            break
    if rendered is None:
        raise FeatherError(f"the chat template in {source} does not render one user turn with one "
                           f"{image_token!r} and the question; export cannot store it")
    before, after = rendered.split(PLACEHOLDER)
    bos = tokens.get("bos_token")
    return PromptTemplate(before, after, not (bos and rendered.startswith(bos)), source)


def prompt_template(source: Path | None, model_id: str) -> PromptTemplate:
    """The artifact's prompt: the checkpoint's chat template rendered, a tiny family model's own,
    or LLaVA-1.5's default."""
    from feather_export.models.tiny import TINY_MODELS

    if source is not None:
        found = find_chat_template(Path(source))
        if found is None:
            return PromptTemplate()
        return render_template(*found, special_tokens(Path(source)))
    chat = getattr(TINY_MODELS.get(model_id), "chat", None)
    if chat is None:
        return PromptTemplate()
    from feather_export.models.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN

    tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN,
              "pad_token": PAD_TOKEN}
    return render_template(TINY_CHAT_TEMPLATES[chat[0]], f"built-in {model_id}", tokens)


def write_chat_template(directory: Path, template: str, location: str) -> None:
    """Store a template where a checkpoint may hold it: ``tokenizer_config`` (merged into the
    existing file), ``chat_template.json`` or ``chat_template.jinja``."""
    if location == "tokenizer_config":
        path = directory / "tokenizer_config.json"
        config = _json(path) if path.is_file() else {}
        config["chat_template"] = template
        path.write_text(json.dumps(config, indent=2) + "\n")
    elif location == "chat_template.json":
        (directory / location).write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    elif location == "chat_template.jinja":
        (directory / location).write_text(template)
    else:
        raise FeatherError(f"unknown chat template location {location!r}")
