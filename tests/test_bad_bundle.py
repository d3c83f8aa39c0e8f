"""A damaged or unusual bundle gets an error (or a warning) that names the problem: missing or altered files, a bad
manifest or preprocessor config, load options, and generation configs that set what ortllava does not implement."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import ortllava
from ortllava import BundleError


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_damaged_bundle_names_the_file(mistral, tmp_path, damage):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    target = copy / "projector.onnx"
    if damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF
        target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="projector.onnx"):
        ortllava.load(copy, provider="cpu")


def test_an_edited_generation_config_says_how_to_change_defaults(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    config = copy / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 7}))
    with pytest.raises(BundleError, match=r"generation_config.json does not match its sha256.*pass them to generate.*verify=False"):
        ortllava.load(copy, provider="cpu")
    assert ortllava.load(copy, provider="cpu", verify=False).settings().max_new_tokens == 7


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(edit):
    def damage(path):
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps(edit(manifest)))
    return damage


def _edit_json(**values):
    """An edit of a JSON file setting `values` at its top level."""
    def damage(path):
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return damage


def _edit_section(section, **values):
    """A manifest edit setting `values` in one section (a callable: from the value there)."""
    def edit(manifest):
        part = dict(manifest[section])
        part.update({key: value(part[key]) if callable(value) else value for key, value in values.items()})
        return {**manifest, section: part}
    return _edit_manifest(edit)


@pytest.mark.parametrize(
    "name, damage, message",
    [  # damage that no sha256 check sees: verify=False, or a manifest edited by hand
        ("embed_tokens.npy", _truncate, r"embed_tokens.npy cannot be read \(ValueError: mmap length"),
        ("image_newline.npy", lambda path: np.save(path, np.zeros(3, np.float32)), r"image_newline.npy cannot be read .*its shape is \[3\]"),
        ("embed_tokens.npy", lambda path: np.save(path, np.load(path)[:-1]), r"embed_tokens.npy cannot be read .*its shape is \[(\d+), \d+\]; the manifest's model wants \[(?!\1)"),
        ("preprocessor_config.json", _edit_json(crop_size={"height": 224, "width": 224}), "preprocessor_config.json cuts 224 px tiles, the vision encoder takes 336"),
        ("preprocessor_config.json", _edit_json(image_mean=[0.5]), r"preprocessor_config.json cannot be read .*image_mean must be one number or three .*got \[0.5\]"),
        # A preprocessor config value transformers refuses at its first call, or that makes wrong pixels: named at load.
        ("preprocessor_config.json", _edit_json(image_mean=None), r"preprocessor_config.json cannot be read .*image_mean is null, but do_normalize is set"),
        ("preprocessor_config.json", _edit_json(rescale_factor=None), r"preprocessor_config.json cannot be read .*rescale_factor is null, but do_rescale"),
        ("preprocessor_config.json", _edit_json(size={"shortest_edge": 0}), r"preprocessor_config.json cannot be read .*size's shortest_edge must be a positive"),
        ("preprocessor_config.json", _edit_json(size={"height": 336}), r"preprocessor_config.json cannot be read .*size must be .*got \{'height': 336\}"),
        ("preprocessor_config.json", _edit_json(image_std=[0.5, 0, 0.5]), r"preprocessor_config.json cannot be read .*image_std must not hold 0"),
        ("preprocessor_config.json", _edit_json(resample="bicubic"), r"preprocessor_config.json cannot be read .*resample must be one of PIL's resampling filters \(0: nearest"),
        ("preprocessor_config.json", _edit_json(resample=99), r"preprocessor_config.json cannot be read .*resampling filters .*got 99"),
        ("chat_template.jinja", lambda path: path.write_text("{% for x in %}"), "chat_template.jinja cannot be read .*TemplateSyntaxError"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], "decoder": {**m["graphs"]["decoder"], "kind": "concat"}}}),
         "its inputs are a gqa decoder's, the manifest says concat"),
        ("manifest.json", _edit_section("vision", patch_size=16), "its image_features's features per tile is 576, the manifest says 441"),
        ("preprocessor_config.json", _edit_json(image_grid_pinpoints=[[336, 672]]), "preprocessor_config.json has image_grid_pinpoints \\[\\[336, 672\\]\\], the manifest"),
        ("tokenizer.json", lambda path: path.write_text("{]"), "tokenizer.json cannot be read"),
        ("preprocessor_config.json", _truncate, "preprocessor_config.json cannot be read"),
        ("generation_config.json", lambda path: path.write_text("[1, 2]"), "generation_config.json cannot be read .*not an object"),
        ("chat_template.jinja", lambda path: path.write_bytes(b"\xff\xfe"), "chat_template.jinja cannot be read"),
        ("manifest.json", lambda path: path.write_text("[]"), "manifest.json is damaged: it holds a JSON list"),
        ("manifest.json", lambda path: path.write_bytes(b"\xff{}"), "manifest.json is unreadable"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "files": list(m["files"])}), "'files' must be a JSON object, got a list"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {k: v for k, v in m["graphs"].items() if k != "decoder"}}), "'graphs' has no decoder"),
        ("manifest.json", _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "text"}), "the key 'text' is missing"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "schema_version": "1"}), "has schema version '1'; this ortllava reads version 1"),
        # A manifest edited so that it no longer describes its graphs and files: named at load, not at the first answer.
        ("manifest.json", _edit_section("text", num_layers="two"), "text.num_layers must be an integer >= 1, got 'two'"),
        ("manifest.json", _edit_section("vision", grid_pinpoints=[]), "vision.grid_pinpoints must be a non-empty list"),
        ("manifest.json", _edit_section("text", num_layers=lambda n: n + 1), r"its keys/values's layer count is (\d+), the manifest says (?!\1)\d+"),
        ("manifest.json", _edit_section("text", num_key_value_heads=1, num_attention_heads=lambda n: n), r"key/value heads is \d+, the manifest says 1"),
        ("manifest.json", _edit_section("text", head_dim=lambda n: n * 2), r"head size is \d+, the manifest says \d+"),
        ("manifest.json", _edit_section("text", vocab_size=lambda n: n + 1), r"logits's width is \d+, the manifest says \d+"),
        ("manifest.json", _edit_section("tokens", image_token_id=5), "the tokenizer gives <image> the id .*, the manifest says 5"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], **{g: {**m["graphs"][g], "dtype": "float16"} for g in ("decoder", "kv_reorder", "feature_splice")}}}),
         r"inputs_embeds's type is tensor\(float\), the manifest says tensor\(float16\)"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], "decoder": {**m["graphs"]["decoder"], "file": "../decoder.onnx"}}}),
         "graphs.decoder.file must be a file name inside the bundle"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "decoder.onnx"}}),
         "'files' lists no sha256 for decoder.onnx, which graph decoder reads"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "chat_template.jinja"}}),
         "holds chat_template.jinja, for which the manifest lists no sha256"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], "kv_reorder": {**m["graphs"]["kv_reorder"], "inputs": ["rows"]}}}),
         r"graphs.kv_reorder.inputs must be the rows, then the decoder's keys/values"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], "kv_reorder": {**m["graphs"]["kv_reorder"], "kv_dtype": "int8"}}}),
         r"graphs.kv_reorder.kv_dtype must be the decoder's key/value dtype, 'float32', got 'int8'"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], "feature_splice": {**m["graphs"]["feature_splice"], "inputs": ["splice_index"]}}}),
         r"graphs.feature_splice must be inputs \['projected_features', 'host_rows', 'splice_index'\] and outputs \['inputs_embeds'\]"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {**m["graphs"], "feature_splice": {**m["graphs"]["feature_splice"], "dtype": "float16"}}}),
         r"graphs.feature_splice.dtype must be the decoder's dtype, 'float32', got 'float16'"),
    ],
)
def test_damaged_files_are_named_without_hashing(mistral, tmp_path, name, damage, message):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    damage(copy / name)
    with pytest.raises(BundleError, match=message):
        ortllava.load(copy, provider="cpu", verify=False)


def test_a_grid_of_partial_tiles_is_refused(mistral, tmp_path):
    """Grid resolutions that are not whole tiles: transformers' processor cuts ceil(side / tile) tiles per side and its
    model packs floor(side / tile), so no answer can be right."""
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    _edit_json(image_grid_pinpoints=[[336, 500]])(copy / "preprocessor_config.json")
    _edit_section("vision", grid_pinpoints=[[336, 500]])(copy / "manifest.json")
    with pytest.raises(BundleError, match=r"the grid resolutions \[\[336, 500\]\] in preprocessor_config.json are not multiples of its 336 px tiles"):
        ortllava.load(copy, provider="cpu", verify=False)


def test_a_crop_size_given_as_one_number_is_a_square(mistral, tmp_path):
    """`"crop_size": 336`, as transformers reads it (`get_size_dict(default_to_square=True)`): 336x336 tiles, the same
    pixels as with {"height": 336, "width": 336} (not a KeyError at the first image)."""
    from conftest import random_image

    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    _edit_json(crop_size=336)(copy / "preprocessor_config.json")
    edited = ortllava.load(copy, provider="cpu", verify=False).processor
    assert edited.image_processor.crop_size == {"height": 336, "width": 336}
    image = random_image(300, 200, seed=5)
    want = ortllava.load(mistral.bundle, provider="cpu").processor(text="<image>", images=[image])
    got = edited(text="<image>", images=[image])
    assert np.array_equal(got["pixel_values"], want["pixel_values"]) and np.array_equal(got["input_ids"], want["input_ids"])


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        ortllava.load(tmp_path, provider="cpu")


def test_bundle_loaded_without_hashing_still_names_a_missing_file(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        ortllava.load(copy, provider="cpu", verify=False)


def test_bad_load_options_are_named(mistral):
    with pytest.raises(ValueError, match="threads must be a number of threads"):
        ortllava.load(mistral.bundle, provider="cpu", verify=False, threads="2")
    with pytest.raises(ValueError, match="max_length must be a positive number"):
        ortllava.load(mistral.bundle, provider="cpu", verify=False, max_length=0)


def test_a_generation_config_with_beams(mistral, tmp_path):
    """A bundle's num_beams applies to generate, as in transformers; a stream or a chat turn, which answer as they go,
    search without beams, with a warning. With do_sample too, generate samples beams (repeatably with a seed), and a
    stream samples without them."""
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    config = copy / "generation_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "num_beams": 3}))
    pipe = ortllava.load(copy, provider="cpu", verify=False)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}]
    assert pipe.settings().num_beams == 3
    beams = pipe.generate(messages=messages, max_new_tokens=6)
    assert beams.token_ids == pipe.generate(messages=messages, max_new_tokens=6, num_beams=3).token_ids
    greedy = pipe.generate(messages=messages, max_new_tokens=6, num_beams=1)
    with pytest.warns(ortllava.GenerationWarning, match="sets num_beams=3, but beam search gives its answers at the end: this answer is searched without beams"):
        streamed = "".join(chunk.text for chunk in pipe.stream(messages=messages, max_new_tokens=6))
    assert streamed == greedy.text
    with pytest.warns(UserWarning, match="searched without beams"):
        assert pipe.chat().send("Tell a story", max_new_tokens=6).text == greedy.text
    with pytest.raises(ValueError, match=r"beam search \(num_beams=2\) gives its answers at the end"):
        pipe.stream(messages=messages, num_beams=2)
    config.write_text(json.dumps({**settings, "num_beams": 3, "do_sample": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (beam sampling is implemented: nothing to warn of at load)
        pipe = ortllava.load(copy, provider="cpu", verify=False)
    assert (pipe.settings().num_beams, pipe.settings().do_sample) == (3, True)
    sampled = [[r.token_ids for r in pipe.generate(messages=messages, max_new_tokens=6, seed=seed, num_return_sequences=3)] for seed in (0, 1)]
    explicit = [r.token_ids for r in pipe.generate(messages=messages, max_new_tokens=6, seed=0, num_return_sequences=3, num_beams=3, do_sample=True)]
    unbeamed = [r.token_ids for r in pipe.generate(messages=messages, max_new_tokens=6, seed=0, num_return_sequences=3, num_beams=1)]
    assert sampled[0] == explicit and sampled[0] != unbeamed and sampled[0] != sampled[1]  # (the config's beams, sampled from the seed)
    with pytest.warns(UserWarning, match="searched without beams"):
        streamed = "".join(chunk.text for chunk in pipe.stream(messages=messages, max_new_tokens=6, seed=0, stop="\n\n"))
    assert streamed == pipe.generate(messages=messages, max_new_tokens=6, seed=0, num_beams=1).text
    with pytest.warns(UserWarning, match="searched without beams"):  # (a chat takes stop strings and logits too)
        assert pipe.chat(stop="\n\n").send("Tell a story", max_new_tokens=6, seed=0, output_logits=True).logits.shape[0] >= 1
    for asked, name in (({"stop": "\n\n"}, "stop strings"), ({"output_logits": True}, "output_logits")):
        with pytest.raises(ValueError, match=rf"generation config sets num_beams=3 \(beam search\), which does not take {name}: pass num_beams=1"):
            pipe.generate(messages=messages, max_new_tokens=6, **asked)


def test_generation_config_settings_not_implemented_are_warned_of(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    config = copy / "generation_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "top_h": 0.4, "guidance_scale": 1.5, "num_beams": 1, "min_p": 0.1, "no_repeat_ngram_size": 2, "max_length": 4096,
                                  "encoder_repetition_penalty": 1.2, "encoder_no_repeat_ngram_size": 3, "typical_p": 0.5, "penalty_alpha": 0.6,
                                  "bad_words_ids": [[5, 6]], "sequence_bias": [[[7], -1.0]], "suppress_tokens": []}))
    with pytest.warns(UserWarning, match=r"sets top_h=0.4, penalty_alpha=0.6, which ortllava does not implement") as caught:
        pipe = ortllava.load(copy, provider="cpu", verify=False)
    message = str(caught[0].message)
    assert len(caught) == 1 and "num_beams" not in message  # values that do nothing are not named
    implemented = ("guidance_scale", "min_p", " no_repeat_ngram_size", "encoder_repetition_penalty", "encoder_no_repeat_ngram_size", "typical_p", "bad_words_ids", "sequence_bias", "suppress_tokens")
    for name in implemented:
        assert name not in message  # applied, as transformers does
    settings = pipe.settings()
    assert (settings.guidance_scale, settings.min_p, settings.no_repeat_ngram_size, settings.typical_p) == (1.5, 0.1, 2, 0.5)
    assert (settings.encoder_repetition_penalty, settings.encoder_no_repeat_ngram_size) == (1.2, 3)
    assert (settings.bad_words_ids, settings.sequence_bias, settings.suppress_tokens) == (((5, 6),), (((7,), -1.0),), None)
