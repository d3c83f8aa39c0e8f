"""nn.Modules that fix each graph's inputs and outputs (the I/O spec of the bundle's three graphs).

- `VisionEncoder`: `pixel_values [n_tiles, 3, H, W]` -> `image_features [n_tiles, n_patches, Dv * n_layers]`,
  the hidden states of `vision_feature_layer` (concatenated when a list) with the select strategy applied.
- `Projector`: `image_features` -> `projected_features [n_tiles, n_patches, D]`.
- `Decoder`: `inputs_embeds [B, S, D]`, `attention_mask [B, P + S]`, `position_ids [B, S]`, past keys/values
  `[B, n_kv, P, head_dim]` per layer -> `logits [B, V]` of the last position, present keys/values `[B, n_kv, P + S, head_dim]`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn


def cache_argument(language_model) -> str:
    """transformers 5 is renaming `past_key_values` to `cache`: the name this version's forward takes."""
    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def output_cache(output):
    """The key/value cache a transformers model output holds. transformers 5 is renaming its field from
    `past_key_values` to `cache` (5.24 has `cache`, and reading the old name warns that it is deprecated; 5.0 has
    only `past_key_values`): read whichever field this version's output has."""
    fields = {field.name for field in dataclasses.fields(output)}
    return output.cache if "cache" in fields else output.past_key_values


def feature_layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


class VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.layers = feature_layers(model.config)
        self.drop_cls = model.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        features = torch.cat([hidden[layer] for layer in self.layers], dim=-1)
        return features[:, 1:] if self.drop_cls else features


class Projector(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.projector = model.model.multi_modal_projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


class Decoder(nn.Module):
    """The language model over a cache built from flat past tensors; one graph for prefill and decode."""

    def __init__(self, model):
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        self.num_layers = self.text_config.num_hidden_layers
        self.cache_argument = cache_argument(self.language_model)

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache

        # A plain cache (no config): full-length layers even for sliding-window models, so present is
        # always past ++ new; the model's own sliding-window mask limits what each position attends to.
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        logits = self.lm_head(out.last_hidden_state[:, -1, :])
        present = []
        for layer in range(self.num_layers):
            present += [cache.layers[layer].keys, cache.layers[layer].values]
        return (logits, *present)


def text_geometry(config) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of the decoder."""
    text = config.text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim
