"""Tiny random LLaVA-NeXT checkpoints, built in code, for offline demos and parity tests.

`build_checkpoint(folder, family=..., layout=...)` writes a folder that `from_pretrained` and
`ortllava-export --model folder` read: random weights, a byte-level BPE tokenizer trained on a fixed
corpus, the family's chat template, and the processor configs in one of the two layouts in use:
- "transformers": what transformers 5 writes (`processor_config.json` with the image processor nested, `chat_template.jinja`);
- "llava-hf": what the published llava-hf repos hold (`preprocessor_config.json`, flat `processor_config.json`, `chat_template.json`).
The towers keep the real geometry (CLIP-L/336: 336 px tiles, 14 px patches, 576 patches per tile; SigLIP/384
for granite-vision: 384 px tiles, 14 px patches, 729 patches, no CLS), so token counts are those of the real
checkpoints; only the widths and depths are tiny.

Families (`TinySpec.family`), each with the distinguishing features of the checkpoints it stands for:
- "mistral": llava-v1.6-mistral-7b (grouped KV heads, sliding window, `[INST]` template).
- "llama": a Vicuna-like Llama decoder (full multi-head attention, `USER:/ASSISTANT:` template), 8192 positions.
- "vicuna": llava-v1.6-vicuna-7b/13b (as "llama", with Vicuna's 4096 positions).
- "yi": llava-v1.6-34b (Llama decoder, 64000-token vocabulary, rope theta 5e6, ChatML, EOS `<|im_end|>`).
- "llama3": llama3-llava-next-8b (128256-token vocabulary, rope theta 5e5 with llama3 rope scaling, the
  `<|start_header_id|>` template, EOS `<|eot_id|>` and `<|end_of_text|>`).
- "qwen2": llava-next-72b/110b (q/k/v biases, ChatML); pass `vocab_size=152064` for Qwen's vocabulary.
- "granite": granite-vision (SigLIP tower, "full" features from several layers, no CLS token, Granite decoder
  with embedding/attention/residual multipliers and logits scaling, tied embeddings).
The model's vocabulary may be larger than the tiny tokenizer's (as in the real checkpoints' padded embeddings).
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

# llava-hf's llama3-llava-next-8b style: BOS written by the template, images first, then text + <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ '<|begin_of_text|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + '<|eot_id|>' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# granite-vision style: a default system prompt, <|system|>/<|user|>/<|assistant|> turns, content in order.
GRANITE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = \"A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\" %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|system|>\n' + system_message + '\n' }}"
    "{%- for message in loop_messages %}{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] + '\n' }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<image>\n' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] + '\n' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
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


CLIP_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# granite-vision's pinpoints are multiples of 384, 1x1 included; the first few of them keep the tests fast.
SIGLIP_PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]


@dataclass
class TinySpec:
    """What varies between tiny checkpoints. `None` fields take the family's value (see `FAMILIES`)."""

    family: str = "mistral"  # a key of FAMILIES
    feature_layer: int | list[int] | None = None
    select_strategy: str | None = None
    vision_layers: int | None = None
    text_layers: int = 2
    hidden_size: int = 64
    max_position_embeddings: int | None = None
    grid_pinpoints: list[list[int]] | None = None
    vocab_size: int | None = None  # the model's vocabulary; None: the family's, else the tokenizer's length
    text_overrides: dict | None = None  # decoder config values over the family's (e.g. {"logits_scaling": 1.0})
    seed: int = 0
    byte_fallback: bool = False  # a SentencePiece-style tokenizer with byte-fallback tokens, as Mistral's and Vicuna's

    def resolved(self) -> TinySpec:
        """This spec with every `None` replaced by the family's value."""
        family = FAMILIES[self.family]
        tower = TOWERS[family.tower]
        return TinySpec(
            family=self.family,
            feature_layer=self.feature_layer if self.feature_layer is not None else tower.feature_layer,
            select_strategy=self.select_strategy or tower.select_strategy,
            vision_layers=self.vision_layers or tower.layers,
            text_layers=self.text_layers,
            hidden_size=self.hidden_size,
            max_position_embeddings=self.max_position_embeddings or family.max_position_embeddings,
            grid_pinpoints=self.grid_pinpoints or tower.grid_pinpoints,
            vocab_size=self.vocab_size or family.vocab_size,
            text_overrides=self.text_overrides,
            seed=self.seed,
            byte_fallback=self.byte_fallback,
        )


@dataclass(frozen=True)
class Tower:
    """A vision tower's geometry and its image processor / processor settings."""

    model_type: str  # "clip_vision_model" or "siglip_vision_model"
    image_size: int
    patch_size: int
    layers: int
    feature_layer: int | list[int]
    select_strategy: str
    grid_pinpoints: list[list[int]]
    num_additional_image_tokens: int  # 1 for CLIP's CLS, 0 for SigLIP
    image_processor: dict  # LlavaNextImageProcessorPil arguments besides the pinpoints


TOWERS = {
    "clip": Tower(
        "clip_vision_model", 336, 14, 3, -2, "default", CLIP_PINPOINTS, 1,
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    ),
    "siglip": Tower(
        "siglip_vision_model", 384, 14, 4, [-4, -3, -2, -1], "full", SIGLIP_PINPOINTS, 0,
        {"size": {"height": 384, "width": 384}, "crop_size": {"height": 384, "width": 384},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    ),
}


@dataclass(frozen=True)
class TinyFamily:
    """The text side of a family: decoder config, tokenizer tokens, chat template, generation EOS."""

    decoder: str  # transformers' text model_type
    template: str
    specials: tuple[str, ...]  # the tokenizer's special tokens, in id order (`<image>` among them)
    bos: str | None  # the tokenizer's BOS token (None: none)
    add_bos: bool  # whether tokenizing adds the BOS
    eos: str  # the tokenizer's EOS token
    pad: str
    kv_heads: int  # of 4 attention heads
    max_position_embeddings: int
    vocab_size: int | None = None  # None: the tokenizer's length
    generation_eos: tuple[str, ...] = ()  # generation_config.eos_token_id when it is a list
    tower: str = "clip"
    text_kwargs: dict = field(default_factory=dict)  # decoder config extras (rope, multipliers, ...)
    tie_word_embeddings: bool = False


_CLASSIC = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
FAMILIES = {
    # Shorter than the prompts of the tests (2-6k tokens), so the sliding window is exercised.
    "mistral": TinyFamily("mistral", MISTRAL_TEMPLATE, _CLASSIC, "<s>", True, "</s>", "<pad>", 2, 8192, text_kwargs={"sliding_window": 1024}),
    "llama": TinyFamily("llama", VICUNA_TEMPLATE, _CLASSIC, "<s>", True, "</s>", "<pad>", 4, 8192),
    "vicuna": TinyFamily("llama", VICUNA_TEMPLATE, _CLASSIC, "<s>", True, "</s>", "<pad>", 4, 4096),
    "yi": TinyFamily(
        "llama", CHATML_TEMPLATE, ("<unk>", "<|startoftext|>", "<|endoftext|>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"),
        "<|startoftext|>", False, "<|im_end|>", "<pad>", 2, 4096, vocab_size=64000,
        text_kwargs={"rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0}},
    ),
    "llama3": TinyFamily(
        "llama", LLAMA3_TEMPLATE,
        ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>", True, "<|eot_id|>", "<pad>", 1, 8192, vocab_size=128256,
        generation_eos=("<|eot_id|>", "<|end_of_text|>"),
        # Llama 3.1's scaling, with the original context shrunk so that 8192 positions stay an 8x extension.
        text_kwargs={"rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
        }},
    ),
    "qwen2": TinyFamily("qwen2", CHATML_TEMPLATE, _CLASSIC + ("<|im_start|>", "<|im_end|>"), None, False, "<|im_end|>", "<pad>", 2, 8192),
    "granite": TinyFamily(
        "granite", GRANITE_TEMPLATE, ("<unk>", "<|end_of_text|>", "<image>"), None, False, "<|end_of_text|>", "<|end_of_text|>",
        2, 131072, vocab_size=49156, tower="siglip", tie_word_embeddings=True,
        # granite-3.1-2b's multipliers; attention_multiplier is 1/head_dim (0.015625 for its head_dim of 64).
        text_kwargs={"embedding_multiplier": 12.0, "attention_multiplier": 1 / 16, "residual_multiplier": 0.22,
                     "logits_scaling": 8.0, "rope_parameters": {"rope_type": "default", "rope_theta": 300000.0}},
    ),
}


def build_tokenizer(family: str = "mistral", vocab_size: int = 600, byte_fallback: bool = False):
    """A byte-level BPE tokenizer trained on `CORPUS`, with `<image>` and the family's special tokens; with
    `byte_fallback`, a SentencePiece-style one instead (as Mistral's, Vicuna's and Yi's `tokenizer.json`: "▁" for
    spaces, the 256 `<0x..>` byte tokens after the special ones for what the vocabulary lacks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    if byte_fallback:
        tokenizer = _sentencepiece_style(spec.specials, vocab_size)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(spec.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    if spec.add_bos:
        bos = tokenizer.token_to_id(spec.bos)
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos)])
    elif not byte_fallback:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec.bos,
        eos_token=spec.eos,
        unk_token="<unk>",
        pad_token=spec.pad,
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def _sentencepiece_style(specials: tuple[str, ...], vocab_size: int):
    """A BPE trained on `CORPUS` the way SentencePiece-converted tokenizers work: spaces as "▁" (normalized, with one
    prepended), merges learned over that, the special tokens first, then the byte tokens `<0x00>`..`<0xFF>`, then
    the learned pieces; decoding turns "▁" back into spaces, byte tokens into bytes, and strips the first space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"<0x{byte:02X}>": len(specials) + byte for byte in range(256)})
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def build_model(spec: TinySpec, tokenizer):
    """A random `LlavaNextForConditionalGeneration` for `spec`; its vocabulary is the family's or the tokenizer's."""
    import torch
    from transformers import (
        CLIPVisionConfig, GraniteConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig,
        Qwen2Config, SiglipVisionConfig,
    )

    spec = spec.resolved()
    family = FAMILIES[spec.family]
    tower = TOWERS[family.tower]
    text_class = {"mistral": MistralConfig, "llama": LlamaConfig, "qwen2": Qwen2Config, "granite": GraniteConfig}[family.decoder]
    heads = 4
    text_kwargs = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=heads,
        num_key_value_heads=family.kv_heads,
        vocab_size=spec.vocab_size or len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=family.tie_word_embeddings,
        # Wider than the default 0.02 so that a random model's logits are far apart and greedy
        # parity is not decided by float noise between two near-equal tokens.
        initializer_range=0.2,
        **{**family.text_kwargs, **(spec.text_overrides or {})},
    )
    if family.decoder != "granite":  # GraniteConfig has no head_dim (it is hidden_size // heads)
        text_kwargs["head_dim"] = spec.hidden_size // heads
    vision_class = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}[tower.model_type]
    vision_kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=spec.vision_layers, num_attention_heads=2,
        image_size=tower.image_size, patch_size=tower.patch_size,
    )
    vision_kwargs.update(projection_dim=32) if tower.model_type == "clip_vision_model" else vision_kwargs.update(vision_use_head=False)
    config = LlavaNextConfig(
        vision_config=vision_class(**vision_kwargs).to_dict(),
        text_config=text_class(**text_kwargs).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        image_grid_pinpoints=spec.grid_pinpoints,
        image_seq_length=(tower.image_size // tower.patch_size) ** 2,
        tie_word_embeddings=family.tie_word_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers starts biases at zero, which would leave every graph's bias wiring untested
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if family.generation_eos:
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(token) for token in family.generation_eos]
    else:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_processor(spec: TinySpec, tokenizer):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    spec = spec.resolved()
    family = FAMILIES[spec.family]
    tower = TOWERS[family.tower]
    image_processor = LlavaNextImageProcessorPil(**tower.image_processor, image_grid_pinpoints=spec.grid_pinpoints)
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=spec.select_strategy,
        chat_template=family.template,
        num_additional_image_tokens=tower.num_additional_image_tokens,
    )


def build_checkpoint(folder: str | Path, spec: TinySpec | None = None, layout: str = "transformers") -> Path:
    """Writes a tiny random checkpoint to `folder` in the given layout; returns the folder."""
    spec = spec or TinySpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.family, byte_fallback=spec.byte_fallback)
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
            "num_additional_image_tokens": processor.num_additional_image_tokens,
            "patch_size": processor.patch_size,
            "processor_class": "LlavaNextProcessor",
            "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        }
        (folder / "processor_config.json").write_text(json.dumps(flat, indent=2))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2))
        for stale in ("chat_template.jinja",):
            (folder / stale).unlink(missing_ok=True)
    else:
        raise ValueError(f"layout must be 'transformers' or 'llava-hf', got {layout!r}")
    return folder
