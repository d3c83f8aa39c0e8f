"""The bundle contract: file names, graph I/O names, and the manifest that describes a bundle.

This module is the one place where the contract between the exporter and the runtime lives. The
exporter imports it to write a bundle; the runtime imports it to read one. It depends on nothing but
the standard library.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# In an export's scratch folder (`DIR.partial`) until the export is complete and moved into place: such a folder may
# hold a manifest whose files all match (the export measures its accuracy through the runtime), but an export killed
# there never finished, so the runtime refuses it (except for the exporter, `reading_export_scratch`).
EXPORT_SCRATCH_MARK = ".ortllava-export-partial"
_READING_EXPORT_SCRATCH = contextvars.ContextVar("reading_export_scratch", default=False)


@contextlib.contextmanager
def reading_export_scratch():
    """Within it, this thread may load an export's scratch folder (the exporter, measuring the bundle it writes)."""
    token = _READING_EXPORT_SCRATCH.set(True)
    try:
        yield
    finally:
        _READING_EXPORT_SCRATCH.reset(token)
GRAPH_NAMES = ("vision_encoder", "projector", "decoder")  # the graphs every bundle has
KV_REORDER_GRAPH = "kv_reorder"  # beam search's row gather over the decoder's keys/values (bundles from 2026-11-27 on)
FEATURE_SPLICE_GRAPH = "feature_splice"  # a prompt's embeddings gathered on the device (gqa bundles from 2026-11-28 on)
T = TypeVar("T")

# Files of a bundle (besides the graphs, whose names the manifest gives).
EMBED_TOKENS_FILE = "embed_tokens.npy"
IMAGE_NEWLINE_FILE = "image_newline.npy"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
# What every bundle has besides its graphs (a chat template and a generation config are optional).
REQUIRED_FILES = (EMBED_TOKENS_FILE, IMAGE_NEWLINE_FILE, TOKENIZER_FILE, PREPROCESSOR_CONFIG_FILE)
OPTIONAL_FILES = (CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE)  # the runtime reads these where present

# Graph I/O names.
PIXEL_VALUES = "pixel_values"  # [n_tiles, 3, H, W]
IMAGE_FEATURES = "image_features"  # [n_tiles, n_patches, Dv * n_layers]
PROJECTED_FEATURES = "projected_features"  # [n_tiles, n_patches, D]
INPUTS_EMBEDS = "inputs_embeds"  # [B, S, D]
ATTENTION_MASK = "attention_mask"  # [B, W] int64: W = P + S ("concat"); a "gqa" step's is its buffers' capacity
POSITION_IDS = "position_ids"  # [B, S] int64
LOGITS = "logits"  # [B, V], last position only
KV_ROWS = "rows"  # [B] int64: kv_reorder's row b of each output is row rows[b] of its input
SPLICE_HOST_ROWS = "host_rows"  # [1 + n_text, D]: feature_splice's image_newline, then the prompt's text embeddings
SPLICE_INDEX = "splice_index"  # [B, T] int64: feature_splice's source row of each embedding (features.splice_index)
FEATURE_SPLICE_INPUTS = [PROJECTED_FEATURES, SPLICE_HOST_ROWS, SPLICE_INDEX]


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def reordered_key_name(layer: int) -> str:
    return f"reordered.{layer}.key"


def reordered_value_name(layer: int) -> str:
    return f"reordered.{layer}.value"


class BundleError(ValueError):
    """A bundle is missing, damaged, or of a schema this runtime cannot read."""


@dataclass
class VisionSpec:
    """The vision side: tiling geometry and what the vision encoder graph returns."""

    image_size: int  # side of one tile, in pixels (336 for CLIP-L/336)
    patch_size: int  # side of one ViT patch, in pixels (14)
    hidden_size: int  # Dv
    feature_layers: list[int]  # hidden-state indices concatenated on the feature axis
    select_strategy: str  # "default" drops the CLS position, "full" keeps every position
    grid_pinpoints: list[list[int]]  # candidate [height, width] resolutions of the anyres grid
    num_additional_image_tokens: int  # positions the tower adds before the patches (1 for CLIP's CLS)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextSpec:
    """The decoder: the facts the runtime needs to size its key/value cache and embed tokens."""

    architecture: str  # e.g. "MistralForCausalLM"
    model_type: str  # e.g. "mistral"
    hidden_size: int  # D
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


@dataclass
class TokenSpec:
    image_token: str
    image_token_id: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token: str | None = None
    padding_side: str = "right"  # the tokenizer's own padding side (what `processor(..., padding=True)` uses)
    clean_up_tokenization_spaces: bool = False  # whether decoding applies transformers' space clean-up


@dataclass
class GraphSpec:
    """One ONNX graph of the bundle and its I/O names."""

    file: str
    inputs: list[str]
    outputs: list[str]
    dtype: str = "float32"
    external_data: list[str] = field(default_factory=list)  # extra files the graph reads its weights from
    # Decoder only. "concat": past and present are separate tensors, present = past ++ new (portable, plain ops).
    # "gqa": GroupQueryAttention over a preallocated key/value buffer that past and present share.
    kind: str = ""
    max_length: int = 0  # decoder only: the most positions the graph serves (0: the model's max_position_embeddings)
    quantization: dict[str, Any] = field(default_factory=dict)  # e.g. {"method": "MatMulNBits", "bits": 4, "block_size": 32, ...}
    # "gqa" decoder only: the key/value buffers' dtype when it is not `dtype` ("int8": quantized with the
    # graph's calibrated per-channel scales, which the op applies as it writes and reads them).
    kv_dtype: str = ""


@dataclass
class Manifest:
    schema_version: int
    vision: VisionSpec
    text: TextSpec
    tokens: TokenSpec
    graphs: dict[str, GraphSpec]  # "vision_encoder", "projector", "decoder"; "kv_reorder" and "feature_splice" in newer bundles
    special_tokens_map: dict[str, Any]  # what the chat template sees as bos_token, eos_token, ...
    precision: str
    provenance: dict[str, Any]
    files: dict[str, str]  # file name -> sha256, every file of the bundle but the manifest
    validation: dict[str, Any] = field(default_factory=dict)  # what the exporter measured against PyTorch
    accuracy: dict[str, Any] = field(default_factory=dict)  # teacher-forced agreement with the fp32 PyTorch model

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A KeyError names a missing key; a TypeError or ValueError, a value of the wrong form."""

        def section(name: str, default: dict | None = None) -> dict[str, Any]:
            value = data[name] if default is None else data.get(name, default)
            if not isinstance(value, dict):
                raise TypeError(f"{name!r} must be a JSON object, got a {type(value).__name__}")
            return value

        graphs = section("graphs")
        missing = [name for name in GRAPH_NAMES if name not in graphs]
        if missing:
            raise ValueError(f"'graphs' has no {', '.join(missing)}")
        files = section("files")
        if not all(isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
            raise TypeError("'files' must map file names to sha256 strings")
        manifest = cls(
            schema_version=data["schema_version"],
            vision=VisionSpec(**section("vision")),
            text=TextSpec(**section("text")),
            tokens=TokenSpec(**section("tokens")),
            graphs={name: GraphSpec(**spec) for name, spec in graphs.items()},
            special_tokens_map=section("special_tokens_map", {}),
            precision=data.get("precision", "fp32"),
            provenance=section("provenance", {}),
            files=files,
            validation=section("validation", {}),
            accuracy=section("accuracy", {}),
        )
        manifest.check()
        return manifest

    def check(self) -> None:
        """Each field's type and range, and every file the runtime reads listed (so hashed); a ValueError naming the
        first that is not (a hand-edited manifest, which no sha256 covers, would otherwise fail later, in
        onnxruntime's words or silently)."""

        def fail(where: str, want: str, value: Any) -> None:
            raise ValueError(f"{where} must be {want}, got {value!r}")

        def whole(where: str, value: Any, least: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                fail(where, f"an integer >= {least}", value)

        text, vision, tokens = self.text, self.vision, self.tokens
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            whole(f"text.{name}", getattr(text, name))
        if text.num_attention_heads % text.num_key_value_heads:
            fail("text.num_attention_heads", f"a multiple of num_key_value_heads ({text.num_key_value_heads})", text.num_attention_heads)
        for name in ("image_size", "patch_size", "hidden_size"):
            whole(f"vision.{name}", getattr(vision, name))
        whole("vision.num_additional_image_tokens", vision.num_additional_image_tokens, least=0)
        if not isinstance(vision.feature_layers, list) or not vision.feature_layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in vision.feature_layers):
            fail("vision.feature_layers", "a non-empty list of layer indices", vision.feature_layers)
        if vision.select_strategy not in ("default", "full"):
            fail("vision.select_strategy", "'default' or 'full'", vision.select_strategy)
        pinpoints = vision.grid_pinpoints
        if not isinstance(pinpoints, list) or not pinpoints or not all(
            isinstance(point, list) and len(point) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in point)
            for point in pinpoints
        ):
            fail("vision.grid_pinpoints", "a non-empty list of [height, width] resolutions", pinpoints)

        def token_id(where: str, value: Any, optional: bool = False) -> None:
            if value is None and optional:
                return
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < text.vocab_size:
                fail(where, f"a token id below vocab_size ({text.vocab_size})" + (", or null" if optional else ""), value)

        if not isinstance(tokens.image_token, str) or not tokens.image_token:
            fail("tokens.image_token", "a non-empty string", tokens.image_token)
        token_id("tokens.image_token_id", tokens.image_token_id)
        token_id("tokens.bos_token_id", tokens.bos_token_id, optional=True)
        token_id("tokens.pad_token_id", tokens.pad_token_id, optional=True)
        if not isinstance(tokens.eos_token_ids, list):
            fail("tokens.eos_token_ids", "a list of token ids", tokens.eos_token_ids)
        for eos in tokens.eos_token_ids:
            token_id("tokens.eos_token_ids", eos)
        if tokens.padding_side not in ("left", "right"):
            fail("tokens.padding_side", "'left' or 'right'", tokens.padding_side)

        for name, graph in self.graphs.items():
            for file in (graph.file, *graph.external_data):
                if not _plain_file_name(file):
                    fail(f"graphs.{name}.file", "a file name inside the bundle", file)
                if file not in self.files:
                    raise ValueError(f"'files' lists no sha256 for {file}, which graph {name} reads")
            if graph.dtype not in ("float32", "float16"):
                fail(f"graphs.{name}.dtype", "'float32' or 'float16'", graph.dtype)
        decoder = self.graphs["decoder"]
        if decoder.kind not in ("gqa", "concat"):
            fail("graphs.decoder.kind", "'gqa' or 'concat'", decoder.kind)
        for name in ("decoder", KV_REORDER_GRAPH):
            if name in self.graphs and self.graphs[name].kv_dtype not in ("", "int8", "float32", "float16"):
                fail(f"graphs.{name}.kv_dtype", "'', 'int8', 'float32' or 'float16'", self.graphs[name].kv_dtype)
        whole("graphs.decoder.max_length", decoder.max_length, least=0)
        reorder = self.graphs.get(KV_REORDER_GRAPH)
        if reorder is not None:  # (it gathers the decoder's own keys/values)
            want = [KV_ROWS, *(name for name in decoder.inputs if name.startswith("past_key_values."))]
            if reorder.inputs != want:
                fail(f"graphs.{KV_REORDER_GRAPH}.inputs", f"the rows, then the decoder's keys/values ({want[:3]}...)", reorder.inputs)
            if (reorder.kv_dtype or reorder.dtype) != (decoder.kv_dtype or decoder.dtype):
                fail(f"graphs.{KV_REORDER_GRAPH}.kv_dtype", f"the decoder's key/value dtype, {decoder.kv_dtype or decoder.dtype!r}", reorder.kv_dtype or reorder.dtype)
        splice = self.graphs.get(FEATURE_SPLICE_GRAPH)
        if splice is not None:  # (it takes the projector's output and gives the decoder's input, in the decoder's dtype)
            if splice.inputs != FEATURE_SPLICE_INPUTS or splice.outputs != [INPUTS_EMBEDS]:
                fail(f"graphs.{FEATURE_SPLICE_GRAPH}", f"inputs {FEATURE_SPLICE_INPUTS} and outputs {[INPUTS_EMBEDS]}", (splice.inputs, splice.outputs))
            if splice.dtype != decoder.dtype:
                fail(f"graphs.{FEATURE_SPLICE_GRAPH}.dtype", f"the decoder's dtype, {decoder.dtype!r}", splice.dtype)
        for file in self.files:
            if not _plain_file_name(file):
                fail("a name in 'files'", "a file name inside the bundle", file)
        for file in REQUIRED_FILES:
            if file not in self.files:
                raise ValueError(f"'files' lists no sha256 for {file}, which every bundle has")


def _plain_file_name(name: Any) -> bool:
    """A file directly in the bundle folder: no folders, no way out of it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: str | Path, verify: bool = True, check_files: bool = True) -> Manifest:
    """Reads `bundle/manifest.json` and checks every listed file exists; with `verify`, also that each matches its
    sha256 (about a second per GB). `check_files=False`: the manifest alone (to describe a damaged bundle).

    Raises `BundleError` naming the first missing or altered file.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        hub_id = not bundle.exists() and len(bundle.parts) == 2 and not bundle.is_absolute()
        hint = f"; if that is a hub id, export a bundle from it first: ortllava-export --model {bundle} --output DIR" if hub_id else ""
        raise BundleError(f"{bundle} is not a bundle folder (it does not exist or is not a directory){hint}")
    if not path.is_file():
        raise BundleError(f"{bundle} is not an ortllava bundle: {MANIFEST_FILE} is missing")
    if (bundle / EXPORT_SCRATCH_MARK).exists() and not _READING_EXPORT_SCRATCH.get():
        raise BundleError(
            f"{bundle} is an unfinished export (an export's scratch folder, marked {EXPORT_SCRATCH_MARK}: the export "
            "stopped before it completed): export the bundle again"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # (JSON and UTF-8 decoding errors are ValueErrors)
        raise BundleError(f"{path} is unreadable: {error}") from error
    if not isinstance(data, dict):
        raise BundleError(f"{path} is damaged: it holds a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema version {version!r}; this ortllava reads version {SCHEMA_VERSION}. "
            "Re-export the bundle with the matching ortllava-export."
        )
    try:
        manifest = Manifest.from_dict(data)
    except KeyError as error:
        raise BundleError(f"{path} is damaged: the key {error} is missing") from error
    except (TypeError, ValueError, AttributeError) as error:
        raise BundleError(f"{path} is damaged: {error}") from error
    if check_files:
        verify_files(bundle, manifest, hashes=verify)
    return manifest


def read_bundle_file(bundle: Path, name: str, read: Callable[[Path], T]) -> T:
    """`read(bundle / name)`, any failure a `BundleError` naming the file: a damaged file that the sha256 check
    did not see (a bundle loaded with verify=False, or edited along with its manifest)."""
    try:
        return read(bundle / name)
    except Exception as error:  # noqa: BLE001 - numpy, tokenizers and json each raise their own types
        raise BundleError(f"bundle {bundle} is damaged: {name} cannot be read ({type(error).__name__}: {error})") from error


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a ValueError if it holds anything else)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    return data


def verify_files(bundle: Path, manifest: Manifest, hashes: bool = True) -> None:
    for name in OPTIONAL_FILES:  # read when present: then hashed like the rest
        if name not in manifest.files and (bundle / name).is_file():
            raise BundleError(
                f"bundle {bundle} holds {name}, for which the manifest lists no sha256: remove the file, or add its sha256 to "
                f"the 'files' of {MANIFEST_FILE} (a chat template can also be passed as chat_template=...)"
            )
    for name, expected in manifest.files.items():
        file = bundle / name
        if not file.is_file():
            raise BundleError(f"bundle {bundle} is damaged: file {name} is missing")
        if hashes and sha256_file(file) != expected:
            edited = (  # the one file a user edits on purpose: say how to change generation defaults instead
                "; to change the generation defaults, pass them to generate (or as CLI flags), or load with verify=False "
                "(--no-verify) to use an edited generation_config.json" if name == "generation_config.json" else ""
            )
            raise BundleError(f"bundle {bundle} is damaged: file {name} does not match its sha256 in the manifest{edited}")
