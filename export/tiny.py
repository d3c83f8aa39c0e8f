"""Tiny random LLaVA-NeXT checkpoints, built in code, for offline demos and parity tests.

`build_checkpoint(folder, family=..., layout=...)` writes a folder that `from_pretrained` and
`ortllava-export --model folder` read: random weights, a byte-level BPE tokenizer trained on a fixed
corpus, the family's chat template, and the processor configs in one of the two layouts in use:
- "transformers": what transformers 5 writes (`processor_config.json` with the image processor nested, `chat_template.jinja`);
- "llava-hf": what the published llava-hf repos hold (`preprocessor_config.json`, flat `processor_config.json`, `chat_template.json`).
The tower keeps CLIP-L/336's geometry (336 px tiles, 14 px patches, 576 patches per tile), so token counts
are those of the real checkpoints; only the widths and depths are tiny.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endif %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + message['content'][0]['text'] + eos_token + ' ' }}{% endgeneration %}"
    "{% else %}{{ raise_exception('Only system, user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a cat sitting on a red sofa next to a window, with sunlight on the floor.",
    "A photo of a street at night: cars, lights, people walking, tall buildings and a bridge.",
    "How many objects are there? There are three apples, two bananas and one orange on the table.",
    "Compare the two images. The first one is brighter; the second one has more colours and detail.",
    "USER: ASSISTANT: [INST] [/INST] system user assistant question answer image picture photo",
    "Ünïcödé test: café, naïve, 東京, 北京, Привет мир, 😀 emoji, ∑ maths, → arrows.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 numbers and dates 2024-05-01, times 12:30.",
]


@dataclass
class TinySpec:
    """What varies between tiny checkpoints."""

    family: str = "mistral"  # "mistral", "llama" or "qwen2"
    feature_layer: int | list[int] = -2
    select_strategy: str = "default"
    vision_layers: int = 3
    text_layers: int = 2
    hidden_size: int = 64
    max_position_embeddings: int = 8192
    grid_pinpoints: list[list[int]] = field(default_factory=lambda: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    seed: int = 0


_FAMILY = {
    "mistral": {"template": MISTRAL_TEMPLATE, "bos": True, "specials": []},
    "llama": {"template": VICUNA_TEMPLATE, "bos": True, "specials": []},
    "qwen2": {"template": CHATML_TEMPLATE, "bos": False, "specials": ["<|im_start|>", "<|im_end|>"]},
}


def build_tokenizer(family: str = "mistral", vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on `CORPUS`, with `<image>` and the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _FAMILY[family]
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"] + spec["specials"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    if spec["bos"]:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    eos = "<|im_end|>" if family == "qwen2" else "</s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>" if spec["bos"] else None,
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_model(spec: TinySpec, tokenizer):
    """A random `LlavaNextForConditionalGeneration` for `spec`, its vocabulary sized to `tokenizer`."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig, Qwen2Config

    text_class = {"mistral": MistralConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}[spec.family]
    heads = 4
    text_kwargs = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if spec.family == "llama" else 2,
        head_dim=spec.hidden_size // heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Wider than the default 0.02 so that a random model's logits are far apart and greedy
        # parity is not decided by float noise between two near-equal tokens.
        initializer_range=0.2,
    )
    if spec.family == "mistral":
        # Shorter than the prompts of the tests (2-6k tokens), so the sliding window is exercised.
        text_kwargs["sliding_window"] = 1024
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=spec.vision_layers, num_attention_heads=2,
        image_size=336, patch_size=14, projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text_class(**text_kwargs).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        image_grid_pinpoints=spec.grid_pinpoints,
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_processor(spec: TinySpec, tokenizer):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=spec.grid_pinpoints
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy=spec.select_strategy,
        chat_template=_FAMILY[spec.family]["template"],
        num_additional_image_tokens=1,
    )


def build_checkpoint(folder: str | Path, spec: TinySpec | None = None, layout: str = "transformers") -> Path:
    """Writes a tiny random checkpoint to `folder` in the given layout; returns the folder."""
    spec = spec or TinySpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.family)
    model = build_model(spec, tokenizer)
    processor = build_processor(spec, tokenizer)
    model.save_pretrained(folder)
    if layout == "transformers":
        processor.save_pretrained(folder)
    elif layout == "llava-hf":
        tokenizer.save_pretrained(folder)
        image_config = processor.image_processor.to_dict()
        image_config["image_processor_type"] = "LlavaNextImageProcessor"
        image_config["processor_class"] = "LlavaNextProcessor"
        (folder / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
        flat = {
            "image_token": "<image>",
            "num_additional_image_tokens": 1,
            "patch_size": 14,
            "processor_class": "LlavaNextProcessor",
            "vision_feature_select_strategy": spec.select_strategy,
        }
        (folder / "processor_config.json").write_text(json.dumps(flat, indent=2))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2))
        for stale in ("chat_template.jinja",):
            (folder / stale).unlink(missing_ok=True)
    else:
        raise ValueError(f"layout must be 'transformers' or 'llava-hf', got {layout!r}")
    return folder
