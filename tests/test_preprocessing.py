"""Preprocessing, token expansion and feature packing against transformers, on images of every shape and mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ortllava.preprocess.image import ImageProcessor, ImageProcessorConfig

from conftest import features_ours_and_transformers, image_cases, random_image

CASES = image_cases()

# Preprocessor configurations besides the tiny checkpoints' one, against transformers' PIL processor built directly.
LLAVA_V16 = {
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "size": {"shortest_edge": 336},
    "crop_size": {"height": 336, "width": 336},
}
CONFIG_VARIANTS = {
    "llava-v1.6": {},
    "height-width-size": {"size": {"height": 336, "width": 336}},
    "no-center-crop": {"do_center_crop": False},
    "no-normalize": {"do_normalize": False},
    "no-rescale": {"do_rescale": False},
    "other-mean-std": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "bilinear": {"resample": 2},
    "384-tiles": {
        "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384]],
        "size": {"shortest_edge": 384},
        "crop_size": {"height": 384, "width": 384},
    },
}


def _variant_images() -> dict[str, object]:
    rng = np.random.default_rng(12)
    return {
        "600x400": random_image(600, 400, seed=13),  # the benchmark case
        "fits-grid-exactly": random_image(672, 672, seed=14),  # no padding
        "1x1": random_image(1, 1, seed=15),
        "array-hwc": rng.integers(0, 256, (240, 360, 3), dtype=np.uint8),
        "array-chw": rng.integers(0, 256, (3, 360, 240), dtype=np.uint8),
        "array-rgba": rng.integers(0, 256, (200, 300, 4), dtype=np.uint8),
        "array-float-integers": rng.integers(0, 256, (200, 300, 3)).astype(np.float32),
        "array-strided": rng.integers(0, 256, (200, 600, 3), dtype=np.uint8)[:, ::2],
        # Either axis could hold the channels: transformers takes the first ((3, 70, 3) is a 70x3 image, (4, 300, 3) a 300x3 one).
        "array-ambiguous": rng.integers(0, 256, (3, 70, 3), dtype=np.uint8),
        "array-ambiguous-rgba": rng.integers(0, 256, (4, 300, 3), dtype=np.uint8),
        "array-chw-rgba": rng.integers(0, 256, (4, 50, 60), dtype=np.uint8),
        "cmyk": random_image(300, 200, seed=16).convert("CMYK"),
        # torch tensors, as transformers takes them (ortllava reads them as arrays, without importing torch)
        "tensor-hwc": torch.from_numpy(rng.integers(0, 256, (240, 360, 3), dtype=np.uint8)),
        "tensor-chw-float": torch.from_numpy(rng.integers(0, 256, (3, 200, 300)).astype(np.float32)),
    }


@pytest.fixture(scope="module")
def hf_processor(mistral):
    return AutoProcessor.from_pretrained(mistral.checkpoint)


def test_reference_is_the_pil_backend(hf_processor):
    assert type(hf_processor.image_processor).__name__ == "LlavaNextImageProcessorPil"


@pytest.mark.parametrize("name", sorted(CASES))
def test_pixel_values_bit_identical(hf_processor, name):
    image = CASES[name]
    ours = ImageProcessor(ImageProcessorConfig.from_dict(hf_processor.image_processor.to_dict()))([image])
    ref = hf_processor.image_processor([image], return_tensors="np")
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"]), "pixel values differ"
    assert np.array_equal(ours["image_sizes"], ref["image_sizes"])


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
def test_config_variants_bit_identical(variant):
    hf = LlavaNextImageProcessorPil(**(LLAVA_V16 | CONFIG_VARIANTS[variant]))
    ours = ImageProcessor(ImageProcessorConfig.from_dict(hf.to_dict()))
    images = _variant_images()
    for name, image in images.items():
        mine, ref = ours([image]), hf([image], return_tensors="np")
        assert mine["pixel_values"].shape == ref["pixel_values"].shape, name
        assert np.array_equal(mine["pixel_values"], ref["pixel_values"]), name
        assert np.array_equal(mine["image_sizes"], ref["image_sizes"]), name
    batch = list(images.values())
    assert np.array_equal(ours(batch)["pixel_values"], hf(batch, return_tensors="np")["pixel_values"])


# preprocessor_config.json forms that transformers reads (`get_size_dict`; a flag set to null is false; a null that
# no step reads is unread), given to both as written, not as transformers' `to_dict` gives them back.
RAW_CONFIG_FORMS = {
    "number-crop-size": {"crop_size": 336},  # a square crop: 336x336
    "number-size": {"size": 336},  # a shortest edge
    "pair-sizes": {"size": [336, 336], "crop_size": [336, 336]},
    "null-flags": {"do_resize": None, "do_center_crop": None, "do_rescale": None, "do_normalize": None},
    "nulls-no-step-reads": {
        "image_mean": None, "image_std": None, "do_normalize": False, "rescale_factor": None, "do_rescale": False,
        "crop_size": None, "do_center_crop": False, "resample": None, "do_resize": False,  # (the grid's resize: bilinear)
    },
}


@pytest.mark.parametrize("form", sorted(RAW_CONFIG_FORMS))
def test_config_forms_read_as_transformers_reads_them(form):
    raw = LLAVA_V16 | RAW_CONFIG_FORMS[form]
    hf, ours = LlavaNextImageProcessorPil.from_dict(raw), ImageProcessor(ImageProcessorConfig.from_dict(raw))
    images = [random_image(600, 400, seed=13), random_image(90, 300, seed=14)]
    mine, ref = ours(images), hf(images, return_tensors="np")
    assert mine["pixel_values"].shape == ref["pixel_values"].shape
    assert np.array_equal(mine["pixel_values"], ref["pixel_values"]) and not np.isnan(mine["pixel_values"]).any()


@pytest.mark.parametrize(
    "edit, message",
    [  # each refused by transformers' processor too, at its first call: here by name, when the config is read
        ({"image_mean": None}, "image_mean is null, but do_normalize is set"),
        ({"image_std": None}, "image_std is null, but do_normalize is set"),
        ({"rescale_factor": None}, "rescale_factor is null, but do_rescale is set"),
        ({"resample": None}, "resample is null, but do_resize is set"),
        ({"size": None}, r"size is null: give \{'shortest_edge': n\} or \{'height': h, 'width': w\}"),
        ({"crop_size": None}, "crop_size is null, but do_center_crop is set"),
        ({"size": {"height": 336}}, r"size must be \{'shortest_edge': n\} or \{'height': h, 'width': w\}: .*got \{'height': 336\}"),
        ({"size": {"shortest_edge": 0}}, "size's shortest_edge must be a positive whole number of pixels, got 0"),
        ({"crop_size": {"height": 336}}, r"crop_size must be \{'height': h, 'width': w\} \(or one number\): .*got \{'height': 336\}"),
        ({"image_grid_pinpoints": None}, r"image_grid_pinpoints must be a non-empty list of \[height, width\] resolutions"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean must be one number or three \(one per RGB channel\), got \[0.5, 0.5\]"),
    ],
)
def test_configs_transformers_refuses_are_refused_by_name(edit, message):
    raw = LLAVA_V16 | edit
    with pytest.raises((ValueError, TypeError)):
        LlavaNextImageProcessorPil.from_dict(raw)([random_image(60, 40)], return_tensors="np")
    with pytest.raises(ValueError, match=message):
        ImageProcessorConfig.from_dict(raw)


def test_a_4d_array_or_tensor_is_one_image_per_row():
    from ortllava.preprocess.inputs import flatten_images

    batch = np.zeros((2, 3, 40, 50), np.uint8)
    assert [image.shape for image in flatten_images(batch)] == [(3, 40, 50)] * 2
    assert [tuple(image.shape) for image in flatten_images(torch.from_numpy(batch))] == [(3, 40, 50)] * 2
    assert len(flatten_images([torch.from_numpy(batch[0])])) == 1


def test_grayscale_array_is_rows_by_columns(hf_processor):
    """A 2-D array is [H, W] whatever H is (transformers takes no 2-D arrays: the reference is the same pixels as
    an "L" image)."""
    gray = np.random.default_rng(17).integers(0, 256, (3, 100), dtype=np.uint8)
    ours = ImageProcessor(ImageProcessorConfig.from_dict(hf_processor.image_processor.to_dict()))([gray])
    ref = hf_processor.image_processor([Image.fromarray(gray, "L")], return_tensors="np")
    assert ours["image_sizes"].tolist() == ref["image_sizes"].tolist() == [[3, 100]]
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"])


def test_the_image_processor_takes_one_image_or_paths(hf_processor, tmp_path):
    """As transformers' image processor, one image alone is a batch of one; a path is opened as everywhere else here
    (load_image); anything else is named."""
    processor = ImageProcessor(ImageProcessorConfig.from_dict(hf_processor.image_processor.to_dict()))
    image = random_image(210, 140, seed=5)
    image.save(tmp_path / "photo.png")
    ref = hf_processor.image_processor(image, return_tensors="np")
    for given in (image, [str(tmp_path / "photo.png")], tmp_path / "photo.png"):
        ours = processor(given)
        assert np.array_equal(ours["pixel_values"], ref["pixel_values"]) and ours["image_sizes"].tolist() == [[140, 210]]
    with pytest.raises(TypeError, match="image 1 is a NoneType: give PIL images, arrays, paths or URLs"):
        processor([image, None])


def test_tiles_matches_call():
    processor = ImageProcessor(ImageProcessorConfig.from_dict(LLAVA_V16))
    image = random_image(600, 400, seed=17)
    tiles = processor.tiles(image)
    assert tiles.shape == (5, 3, 336, 336) and tiles.dtype == np.float32
    assert np.array_equal(tiles, processor([image])["pixel_values"][0])


def test_batch_mixing_sizes_pads_missing_tiles_with_zeros(hf_processor, pipe):
    images = [CASES[name] for name in ("square", "strip-wide", "rgba", "small", "palette-transparent")]
    ours = pipe.processor.image_processor(images)
    ref = hf_processor.image_processor(images, return_tensors="np")
    assert ours["pixel_values"].shape == ref["pixel_values"].shape == (5, 5, 3, 336, 336)
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"])
    # "strip-wide" is a 1x3 grid: 4 tiles, so its fifth tile is padding.
    assert not ours["pixel_values"][1, 4].any()


@pytest.mark.parametrize("name", sorted(CASES))
def test_input_ids_identical(hf_processor, pipe, name):
    prompt = "[INST] <image>\nWhat is in this picture? [/INST]"
    ref = hf_processor(text=prompt, images=[CASES[name]], return_tensors="np")
    ours = pipe.processor(text=prompt, images=[CASES[name]])
    assert np.array_equal(ours["input_ids"], ref["input_ids"])
    assert np.array_equal(ours["attention_mask"], ref["attention_mask"])


def test_processor_call_as_transformers(hf_processor, pipe):
    """The call's positional order (images, text), its outputs' order and attribute access, `return_tensors`,
    padding to a length, a 4-D array as a batch of images, and decoding."""
    image, prompt = CASES["wide"], "[INST] <image>\nWhat is this? [/INST]"
    want = hf_processor(image, prompt, return_tensors="np")
    got = pipe.processor(image, prompt, return_tensors="np")
    assert list(got) == list(want) == ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
    assert all(np.array_equal(got[key], want[key]) for key in want) and got.input_ids is got["input_ids"]
    padded = pipe.processor(text=["[INST] Hi [/INST]"], padding="max_length", max_length=12, padding_side="left")
    reference = hf_processor(text=["[INST] Hi [/INST]"], padding="max_length", max_length=12, padding_side="left", return_tensors="np")
    assert np.array_equal(padded["input_ids"], reference["input_ids"]) and padded["input_ids"].shape == (1, 12)
    # A prompt longer than max_length is not cut: alone it keeps its length; beside a shorter one, the rows cannot
    # make one array. transformers then returns an object array of ragged rows, which no model takes; we refuse.
    texts = ["[INST] Hi [/INST]", "[INST] A longer question, with more words in it [/INST]"]
    alone = dict(text=texts[1:], padding="max_length", max_length=5, pad_to_multiple_of=4, return_tensors="np")
    assert np.array_equal(pipe.processor(**alone)["input_ids"], hf_processor(**alone)["input_ids"])
    both = dict(text=texts, padding="max_length", max_length=12, return_tensors="np")
    ragged = hf_processor(**both)["input_ids"]
    assert ragged.dtype == object and len(ragged[0]) == 12 < len(ragged[1])
    with pytest.raises(ValueError, match=r"padding='max_length' pads the prompts to max_length=12 tokens, but one is \d+ tokens long"):
        pipe.processor(**both)
    with pytest.raises(ValueError, match="cannot make one array"):
        pipe.processor.tokenizer(texts, padding="max_length", max_length=12, return_tensors="np")
    assert [len(row) for row in pipe.processor.tokenizer(texts, padding="max_length", max_length=12)["input_ids"]] == [
        max(12, len(row)) for row in hf_processor.tokenizer(texts)["input_ids"]
    ]  # (as lists they may differ in length: no error, as transformers')
    assert "attention_mask" not in pipe.processor(text=prompt, images=[image], return_attention_mask=False)
    frames = np.stack([np.asarray(CASES["square"]), np.asarray(CASES["square"])])  # [2, H, W, 3]: two images
    two = "[INST] <image> <image> [/INST]"
    assert np.array_equal(pipe.processor(frames, two)["pixel_values"], hf_processor(frames, two, return_tensors="np")["pixel_values"])
    with pytest.raises(ValueError, match="ortllava returns numpy arrays"):
        pipe.processor(image, prompt, return_tensors="pt")
    typed = dict(return_mm_token_type_ids=True, padding=True, pad_to_multiple_of=8)
    want, got_typed = hf_processor([image], [prompt, "[INST] Hi [/INST]"], return_tensors="np", **typed), pipe.processor([image], [prompt, "[INST] Hi [/INST]"], **typed)
    assert list(got_typed) == list(want) and all(np.array_equal(got_typed[key], want[key]) for key in want) and want["input_ids"].shape[1] % 8 == 0
    for name in ("vision_feature_select_strategy", "model_input_names", "patch_size", "num_additional_image_tokens"):
        assert getattr(pipe.processor, name) == getattr(hf_processor, name), name
    ours_images, theirs_images = pipe.processor.image_processor, hf_processor.image_processor
    for name in ("image_mean", "image_std", "image_grid_pinpoints", "model_input_names", "do_pad"):
        assert list(np.ravel(getattr(ours_images, name))) == list(np.ravel(getattr(theirs_images, name))), name
    assert ours_images.crop_size["height"] == theirs_images.crop_size["height"] and ours_images.size["shortest_edge"] == theirs_images.size["shortest_edge"]
    alone = ours_images(image, return_tensors="np")
    assert np.array_equal(alone["pixel_values"], theirs_images(image, return_tensors="np")["pixel_values"])
    ids = got["input_ids"]
    assert pipe.processor.decode(ids) == hf_processor.batch_decode(ids) and pipe.processor.decode(int(ids[0, 1])) == hf_processor.decode(int(ids[0, 1]))
    assert pipe.processor.decode(ids.tolist()) == hf_processor.decode(ids.tolist())  # a list of lists is a batch too


def test_tokenizer_settings_steer_the_processor(hf_processor, pipe):
    """`processor.tokenizer.padding_side` (and `truncation_side`) set by hand change the processor's output, as in
    transformers (the processor keeps no copy of them); a call's `padding_side` still wins."""
    texts = ["[INST] <image>\nA longer question, with more words in it [/INST]", "[INST] <image> Hi [/INST]"]
    images = [CASES["wide"], CASES["square"]]
    default = pipe.processor.tokenizer.padding_side
    try:
        for side in ("left", "right"):
            hf_processor.tokenizer.padding_side = pipe.processor.tokenizer.padding_side = side
            want = hf_processor(images=images, text=texts, padding=True, return_tensors="np")
            got = pipe.processor(images=images, text=texts, padding=True)
            assert all(np.array_equal(got[key], want[key]) for key in ("input_ids", "attention_mask")), side
            short = int(got["attention_mask"].sum(axis=1).argmin())  # (the row that is padded)
            assert got["attention_mask"][short, 0 if side == "right" else -1] == 1 and got["attention_mask"][short, -1 if side == "right" else 0] == 0
            other = "right" if side == "left" else "left"
            override = pipe.processor(images=images, text=texts, padding=True, padding_side=other)
            assert np.array_equal(override["input_ids"], hf_processor(images=images, text=texts, padding=True, padding_side=other, return_tensors="np")["input_ids"])
            chats = [[{"role": "user", "content": [{"type": "text", "text": text}]}] for text in ("Hi", "A longer question, with words")]
            assert pipe.prepare(messages=chats)[0]["attention_mask"][:, -1].all()  # (generation's inputs: padded on the left, always)
    finally:
        hf_processor.tokenizer.padding_side = pipe.processor.tokenizer.padding_side = default


def test_truncation_as_transformers(hf_processor, pipe):
    """`max_length` without padding truncates, as `truncation=True` does; `truncation=False` keeps the whole prompt; a
    cut into an image's tokens is refused (transformers' processor refuses the mismatch too)."""
    texts = ["[INST] A rather long question about nothing in particular, really. [/INST]", "[INST] Hi [/INST]"]
    for options in (dict(max_length=8), dict(max_length=8, truncation=True), dict(max_length=8, truncation=False),
                    dict(max_length=8, truncation="longest_first", padding=True), dict(max_length=30, padding="max_length", truncation=True)):
        want = hf_processor(text=texts, return_tensors="np", **{"padding": True, **options})
        got = pipe.processor(text=texts, **{"padding": True, **options})
        assert np.array_equal(got["input_ids"], want["input_ids"]) and np.array_equal(got["attention_mask"], want["attention_mask"]), options
    for side in ("left", "right"):  # the special tokens stay (a BOS is never cut)
        hf_processor.tokenizer.truncation_side = pipe.processor.tokenizer.truncation_side = side
        try:
            want = hf_processor(text=texts, max_length=8, truncation=True, padding=True, return_tensors="np")["input_ids"]
            assert np.array_equal(pipe.processor(text=texts, max_length=8, truncation=True, padding=True)["input_ids"], want), side
            assert want[0, 0] == pipe.processor.tokenizer.bos_token_id
        finally:
            hf_processor.tokenizer.truncation_side = pipe.processor.tokenizer.truncation_side = "right"
    one = pipe.processor(text=texts[0], max_length=8)  # no padding: truncated
    assert np.array_equal(one["input_ids"], hf_processor(text=texts[0], max_length=8, return_tensors="np")["input_ids"]) and one["input_ids"].shape == (1, 8)
    image, prompt = CASES["wide"], "[INST] <image>\nWhat is this? [/INST]"
    whole = pipe.processor(image, prompt)["input_ids"].shape[1]
    assert np.array_equal(pipe.processor(image, prompt, max_length=whole - 3)["input_ids"], hf_processor(image, prompt, max_length=whole - 3, return_tensors="np")["input_ids"])
    with pytest.raises(ValueError, match=r"truncating prompt 0 .* would drop \d+ of its \d+ image tokens"):
        pipe.processor(image, prompt, max_length=10)
    with pytest.raises(ValueError):
        hf_processor(image, prompt, max_length=10)
    for bad in (dict(max_length=0), dict(max_length=8, truncation="only_second")):
        with pytest.raises(ValueError, match="max_length|truncation"):
            pipe.processor(text=texts[0], **bad)


def test_decoding_as_transformers(hf_processor, pipe):
    """decode: one id, a sequence, a batch (list of lists, 2-D array, anything with tolist); batch_decode of one
    sequence gives its one text in a list; the clean-up of tokenization spaces is never applied to a BPE tokenizer."""
    ids = pipe.processor(text=["[INST] Hello , world . it 's me [/INST]", "[INST] Hi [/INST]"], padding=True)["input_ids"]

    class Tensorish:  # what a torch tensor offers here
        def __init__(self, array):
            self.array = array

        def tolist(self):
            return self.array.tolist()

    for value in (ids, ids.tolist(), ids[0], ids[0].tolist(), int(ids[0, 1])):
        assert pipe.processor.decode(value) == hf_processor.decode(value)
    assert pipe.processor.decode(Tensorish(ids)) == hf_processor.decode(ids.tolist())
    for value in (ids, ids[0].tolist(), []):
        assert pipe.processor.batch_decode(value) == hf_processor.batch_decode(value)
    assert type(pipe.processor.tokenizer.model).__name__ == "BPE"
    for clean in (None, True, False):
        assert pipe.processor.decode(ids[0], skip_special_tokens=True, clean_up_tokenization_spaces=clean) == hf_processor.decode(
            ids[0], skip_special_tokens=True, clean_up_tokenization_spaces=clean)
    assert " ," in pipe.processor.decode(ids[0], clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("config", ["mistral", "vicuna", "llama3"])
def test_the_tokenizer_as_transformers(tiny_store, config):
    """`processor.tokenizer` answers what transformers' tokenizer answers: a call (one text, several, padded, as
    arrays), encode, decode, special tokens and their ids, token <-> id, sizes; the `tokenizers` object underneath is
    `backend_tokenizer`, as there."""
    import ortllava
    from tokenizers import Tokenizer

    model = tiny_store.get(config)
    theirs = AutoProcessor.from_pretrained(model.checkpoint).tokenizer
    ours = ortllava.load(model.bundle, provider="cpu", verify=False).processor.tokenizer
    assert isinstance(ours.backend_tokenizer, Tokenizer)
    texts = ["Hello there, how are you?", "A photo <image> of 3 cats."]
    for call in (dict(text=texts[0]), dict(text=texts), dict(text=texts, padding=True), dict(text=texts, add_special_tokens=False),
                 dict(text=texts, padding=True, padding_side="right"), dict(text=texts, padding="max_length", max_length=20),
                 dict(text=texts, padding=True, return_tensors="np"), dict(text=texts, truncation=True, max_length=5),
                 dict(text=texts[1], max_length=4), dict(text=texts, padding=True, truncation=True, max_length=6, add_special_tokens=False)):
        got, want = ours(**call), theirs(**call)
        assert list(got) == ["input_ids", "attention_mask"]
        for key in got:
            plain = (lambda v: v.tolist() if hasattr(v, "tolist") else v)
            assert plain(got[key]) == plain(want[key]), (call, key)
            assert isinstance(got[key], np.ndarray) == ("return_tensors" in call)
    ours.truncation_side = theirs.truncation_side = "left"
    assert ours(texts, truncation=True, max_length=5)["input_ids"] == theirs(texts, truncation=True, max_length=5)["input_ids"]
    ours.truncation_side = theirs.truncation_side = "right"
    assert ours.encode(texts[1]) == theirs.encode(texts[1]) and ours.encode(texts[1], add_special_tokens=False) == theirs.encode(texts[1], add_special_tokens=False)
    ids = theirs(texts, padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids[1], skip_special_tokens=skip) == theirs.decode(ids[1], skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size", "padding_side"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab() and set(ours.all_special_ids) == set(theirs.all_special_ids)
    tokens = theirs.convert_ids_to_tokens(ids[0])
    assert ours.convert_ids_to_tokens(ids[0]) == tokens and ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<image>") == theirs.convert_tokens_to_ids("<image>")
    assert ours.token_to_id("<image>") == ours.backend_tokenizer.token_to_id("<image>")  # (the backend's own names read through)
    # The rest of what inference code reaches for, as transformers answers it.
    for name in ("all_special_ids", "all_special_tokens", "special_tokens_map", "model_max_length", "image_token", "image_token_id",
                 "sep_token", "cls_token", "mask_token", "is_fast", "truncation_side"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.convert_ids_to_tokens(ids[0], skip_special_tokens=True) == theirs.convert_ids_to_tokens(ids[0], skip_special_tokens=True)
    assert ours.tokenize(texts[1]) == theirs.tokenize(texts[1]) and ours.convert_tokens_to_string(tokens) == theirs.convert_tokens_to_string(tokens)
    assert np.array_equal(ours.encode(texts[0], return_tensors="np"), theirs.encode(texts[0], return_tensors="np"))
    for multiple in (4, 8):
        for padding in (True, "max_length"):
            call = dict(padding=padding, max_length=17, pad_to_multiple_of=multiple, return_tensors="np")
            assert np.array_equal(ours(texts, **call)["input_ids"], theirs(texts, **call)["input_ids"]), call
    chats = [[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}], [{"role": "user", "content": "How are you?"}]]
    assert ours.chat_template == theirs.chat_template  # (the checkpoint tokenizer's own: the exporter keeps it in tokenizer_config.json)
    if theirs.chat_template is None:
        with pytest.raises(ValueError, match="no chat template of its own"):
            ours.apply_chat_template(chats[0])
        ours.chat_template = theirs.chat_template = AutoProcessor.from_pretrained(model.checkpoint).chat_template
    # (a template that reads content parts renders a string's text as nothing in transformers; here as the same text
    # given as a part)
    reads_parts = "How are you?" not in theirs.apply_chat_template(chats[1], tokenize=False)
    as_parts = [chats[0], [{"role": "user", "content": [{"type": "text", "text": "How are you?"}]}]] if reads_parts else chats
    for options in (dict(tokenize=False), dict(), dict(add_generation_prompt=True, return_dict=False), dict(padding=True, return_tensors="np")):
        for conversation, same in ((chats[0], chats[0]), (chats, as_parts)):
            got, want = ours.apply_chat_template(conversation, **options), theirs.apply_chat_template(same, **options)
            listed = (lambda v: v.tolist() if hasattr(v, "tolist") else v)
            plain = (lambda v: {k: listed(x) for k, x in v.items()} if hasattr(v, "keys") else listed(v))
            assert plain(got) == plain(want), (options, conversation)
    conversation = chats[1]
    assert ours.apply_chat_template(conversation, max_length=5) == dict(theirs.apply_chat_template(as_parts[1], max_length=5))  # (no cut)
    parts = [{"role": "user", "content": [{"type": "thinking", "text": "hm"}, {"type": "text", "text": "Hi"}]}]  # (types a text template may read)
    template = "{% for m in messages %}{% for p in m['content'] %}{{ p['type'] }}={{ p['text'] }};{% endfor %}{% endfor %}"
    assert ours.apply_chat_template(parts, chat_template=template, tokenize=False) == theirs.apply_chat_template(parts, chat_template=template, tokenize=False) == "thinking=hm;text=Hi;"
    with pytest.raises(ValueError):
        theirs.apply_chat_template(conversation, add_generation_prompt=True, continue_final_message=True)
    for options, message in ((dict(add_generation_prompt=True, continue_final_message=True), "exclude each other"),
                             (dict(return_assistant_tokens_mask=True), "not implemented by ortllava"), (dict(conversation=[]), "at least one message")):
        with pytest.raises(ValueError, match=message):
            ours.apply_chat_template(**{"conversation": conversation, **options})
    # A tokenizer whose model_max_length bounds it: truncation and padding="max_length" without a max_length use it.
    ours.model_max_length = theirs.model_max_length = 6
    try:
        for call in (dict(truncation=True), dict(padding="max_length"), dict(padding="max_length", truncation=True, return_tensors="np")):
            got, want = ours(texts, **call), theirs(texts, **call)
            assert listed(got["input_ids"]) == listed(want["input_ids"]), call
        with pytest.raises(ValueError, match=r"truncation length \(6\) is not a multiple of pad_to_multiple_of \(4\)"):
            ours(texts, truncation=True, padding=True, pad_to_multiple_of=4)
    finally:
        ours.model_max_length = theirs.model_max_length = int(1e30)
    for wrong, error in (("middle", ValueError), (None, ValueError)):
        with pytest.raises(error, match="padding_side must be 'left' or 'right'"):
            ours.padding_side = wrong
    with pytest.raises(ValueError, match="text_pair"):
        ours("a cat", "a dog")
    with pytest.raises(TypeError, match="encode takes one text"):
        ours.encode(texts)
    with pytest.raises(AttributeError, match="BundleTokenizer has no attribute 'save_pretrained'"):
        ours.save_pretrained
    # Older tokenizer configs: extra special tokens as a dict are named ones (as transformers 5 reads them), and a
    # list of named chat templates gives its "default" one.
    from ortllava.preprocess.tokenizer import BundleTokenizer

    pipe = ortllava.load(model.bundle, provider="cpu", verify=False)
    config = {"bos_token": ours.bos_token, "extra_special_tokens": {"image_token": "<image>"}, "chat_template": [{"name": "default", "template": "T"}]}
    older = BundleTokenizer(ours.backend_tokenizer, pipe.manifest, config)
    assert older.image_token == "<image>" and older.image_token_id == ours.convert_tokens_to_ids("<image>") and older.special_tokens_map["image_token"] == "<image>"
    assert older.chat_template == "T" and older.extra_special_tokens == []


def test_batch_input_ids_identical_with_left_padding(hf_processor, pipe):
    prompts = ["[INST] <image>\nDescribe. [/INST]", "[INST] Only text here, somewhat longer. [/INST]", "[INST] <image> and <image>? [/INST]"]
    images = [CASES["wide"], CASES["tall"], CASES["gray"]]
    ref = hf_processor(text=prompts, images=images, padding=True, return_tensors="np")
    ours = pipe.processor(text=prompts, images=images, padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert np.array_equal(ours[key], ref[key]), key


def test_packed_features_match_transformers(mistral, pipe):
    images = [CASES[name] for name in ("square", "wide", "tall", "small", "strip-wide", "strip-tall")]
    ours, ref, inputs = features_ours_and_transformers(pipe, mistral.checkpoint, images)
    assert ours.shape == ref.shape
    expected_rows = sum(pipe.processor.num_image_tokens(*size) for size in inputs["image_sizes"].tolist())
    assert ours.shape[0] == expected_rows
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_images_packed_into_the_embeddings_as_packed_apart(pipe):
    """`embed` packs projected tiles straight into their `<image>` rows (the main path); the result must be the
    packed features spliced in, bit for bit: a batch (left padding, two images in one row, each image's tokens
    after the other's with no text between), into fp16 embeddings, and a prompt whose image tokens text splits."""
    from ortllava.embedding.features import embed

    prompts = ["[INST] <image>\nDescribe. [/INST]", "[INST] Text only, and longer than the first one. [/INST]", "[INST] <image><image> [/INST]"]
    images = [CASES["wide"], CASES["tall"], CASES["strip-wide"]]
    inputs = pipe.processor(text=prompts, images=images, padding=True)
    projected = pipe.project_images(inputs["pixel_values"], inputs["image_sizes"])
    packed = projected.pack()
    assert projected.lengths() == [pipe.processor.num_image_tokens(*size) for size in inputs["image_sizes"].tolist()]
    ids, table, image_id = inputs["input_ids"], pipe.embed_table, pipe.manifest.tokens.image_token_id
    for dtype in (np.float32, np.float16):
        np.testing.assert_array_equal(embed(ids, table, image_id, projected, dtype), embed(ids, table, image_id, packed, dtype))
    split = ids[:1].copy()  # the first image's tokens, a text token in their middle: packed apart, then spliced
    row = np.flatnonzero(split[0] == image_id)
    split = np.insert(split, row[len(row) // 2], 5, axis=1)
    first = pipe.project_images(inputs["pixel_values"][:1], inputs["image_sizes"][:1])
    np.testing.assert_array_equal(embed(split, table, image_id, first), embed(split, table, image_id, first.pack()))
    with pytest.raises(ValueError, match="image tokens but the images gave"):
        embed(ids[:1], table, image_id, projected)


def test_the_splice_index_gathers_the_embeddings_embed_writes(pipe):
    """The device path's index (`feature_splice` gathers by it): rows [newline, text embeddings, every tile's
    features] taken by it are `embed`'s output bit for bit, for a batch (left padding, two images back to back) and a
    prompt whose image tokens text splits; a wrong count of image tokens is refused in `embed`'s words."""
    from ortllava.embedding.features import embed, splice_index

    prompts = ["[INST] <image>\nDescribe. [/INST]", "[INST] Text only, and longer than the first one. [/INST]", "[INST] <image><image> [/INST]"]
    inputs = pipe.processor(text=prompts, images=[CASES["wide"], CASES["tall"], CASES["strip-wide"]], padding=True)
    split = inputs["input_ids"][:1]
    row = np.flatnonzero(split[0] == pipe.manifest.tokens.image_token_id)
    split = np.insert(split, row[len(row) // 3], 5, axis=1)
    image_id, table = pipe.manifest.tokens.image_token_id, pipe.embed_table
    for ids, images in ((inputs["input_ids"], slice(None)), (split, slice(0, 1))):
        projected = pipe.project_images(inputs["pixel_values"][images], inputs["image_sizes"][images])
        tiles = projected.tiles
        index, text_ids = splice_index(ids, image_id, projected.image_sizes, projected.tiles_per_image, tiles.shape[1], projected.grid_pinpoints, projected.tile_size)
        assert index.shape == ids.shape and text_ids.tolist() == ids[ids != image_id].tolist()
        rows = np.concatenate([pipe.image_newline[None], table[text_ids], tiles.reshape(-1, tiles.shape[-1])])
        np.testing.assert_array_equal(rows[index], embed(ids, table, image_id, projected))
    with pytest.raises(ValueError, match="image tokens but the images gave"):
        splice_index(inputs["input_ids"][:1], image_id, projected.image_sizes * 2, projected.tiles_per_image * 2, tiles.shape[1], projected.grid_pinpoints, projected.tile_size)


def test_preprocessing_in_a_forked_child_after_the_parent_preprocessed(pipe):
    """The base tile is resized on a helper thread, which a forked child does not inherit: the child must make its
    own rather than wait forever for the parent's (a server that forks workers after a warm-up does this)."""
    import os
    import signal

    processor = pipe.processor.image_processor
    image = random_image(600, 400, seed=3)
    want = processor([image])["pixel_values"]
    pid = os.fork()
    if pid == 0:  # the child: killed by the alarm if it hangs
        signal.alarm(60)
        os._exit(0 if np.array_equal(processor([image])["pixel_values"], want) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
