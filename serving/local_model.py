"""Builds tiny, randomly initialised Llama models that Tandem can serve offline.

No model hub can be reached from the machines this project runs on, so the
models used in development and tests are made here from nothing: a byte-level
BPE tokenizer trained on a corpus generated in code, and a
``LlamaForCausalLM`` with seeded random weights. The weights are noise, so the
text generated is gibberish, but every file is in the standard Hugging Face
layout and loads in ``transformers`` and in vLLM like any downloaded model.

Builds are deterministic: the same spec always yields byte-identical
``tokenizer.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_MARKER = ".tandem-build.json"
"""File written last into a model directory; its presence means the build completed."""

BUILD_FORMAT_VERSION = 1
"""Bumped whenever the build output changes, so stale caches are rebuilt."""

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
THINK_OPEN_TOKEN = "<think>"
THINK_CLOSE_TOKEN = "</think>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    THINK_OPEN_TOKEN,
    THINK_CLOSE_TOKEN,
    PAD_TOKEN,
)

REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Shape and identity of one locally built model.

    Attributes:
        name: Directory name of the model inside the cache directory.
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        num_heads: Number of attention (query) heads; ``hidden_size / num_heads``
            must be 64, a head size vLLM's CPU attention supports.
        num_kv_heads: Number of key/value heads (grouped-query attention).
        intermediate_size: Width of the MLP.
        vocab_size: Size of the tokenizer vocabulary and the embedding matrix.
        max_position_embeddings: Longest sequence the model accepts.
        opens_think: Whether the chat template's generation prompt opens a
            ``<think>`` block, as reasoning models do.
        seed: Seed for the training corpus and the weight initialisation.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    opens_think: bool
    seed: int

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_heads


LOCAL_MODELS: tuple[TinyModelSpec, ...] = (
    TinyModelSpec(
        name="tiny-intent",
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=384,
        vocab_size=4096,
        max_position_embeddings=4096,
        opens_think=False,
        seed=1234,
    ),
    TinyModelSpec(
        name="tiny-reasoning",
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=768,
        vocab_size=8192,
        max_position_embeddings=4096,
        opens_think=True,
        seed=5678,
    ),
)

_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] if part['type'] == 'text' %}"
    "{{- part['text'] }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n%GENERATION_SUFFIX%' }}"
    "{%- endif %}"
)

_WORDS = (
    "the a an and or but if then else when while for with without to from of in on at by "
    "is are was were be been being have has had do does did can could will would should may "
    "might must shall not no yes all any some many much more most few less least each every "
    "I you he she it we they me him her us them my your his its our their this that these those "
    "what which who whom whose where why how here there now today tomorrow yesterday always never "
    "time year day week month hour minute second people person man woman child world life hand "
    "part place case point group number fact question answer problem reason idea model token "
    "request response server client queue batch cache memory latency throughput prompt system "
    "user assistant message intent route plan step result error value list string number file "
    "data text code function class method test build run start stop send receive read write "
    "open close load save find search sort merge split join count check make take give get "
    "go come see know think say tell ask work call try need feel become leave put mean keep "
    "let begin seem help show hear play move live believe hold bring happen turn stand lose "
    "pay meet include continue set learn change lead understand watch follow create speak "
    "allow add spend grow offer remember love consider appear buy wait serve die send expect "
    "good new first last long great little own other old right big high different small large "
    "next early young important public bad same able fast slow quick simple hard easy ready "
    "weather flight hotel order book cancel refund price account password email calendar "
    "meeting schedule reminder music song light alarm timer recipe translate summarize"
).split()

_SYLLABLES = (
    "ka ri to na me lo su fi ve zu pra tre blo gan dor mis tel quo xen yar "
    "ber cal dun eth fol gri hum ist jok lem mon nar oth pel ros sten tur "
    "ul vin wex yol zan ae io ou ch sh th ng st"
).split()

_UNICODE_SNIPPETS = (
    "café naïve über façade smörgåsbord 日本語 中文 한국어 русский ελληνικά עברית العربية "
    "हिन्दी 😀 🚀 ✓ → ∑ π≈3.14 €10 £5 ¥100 °C"
).split()


def model_path(cache_dir: Path, name: str) -> Path:
    """Returns the directory a model of the given name is built into.

    Args:
        cache_dir: Root directory holding locally built models.
        name: Name of a model spec.

    Returns:
        ``cache_dir / name``.
    """
    return Path(cache_dir) / name


def _spec_by_name(name: str) -> TinyModelSpec:
    for spec in LOCAL_MODELS:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in LOCAL_MODELS)
    raise KeyError(f"unknown local model {name!r}; known: {known}")


def _marker_content(spec: TinyModelSpec) -> dict:
    return {"format_version": BUILD_FORMAT_VERSION, "spec": dataclasses.asdict(spec)}


def is_built(cache_dir: Path, name: str) -> bool:
    """Tells whether a complete, up-to-date build of a model is in the cache.

    Args:
        cache_dir: Root directory holding locally built models.
        name: Name of a model spec in ``LOCAL_MODELS``.

    Returns:
        True if the build marker matches the current spec and format version and
        every required file is present.

    Raises:
        KeyError: If ``name`` is not in ``LOCAL_MODELS``.
    """
    path = model_path(cache_dir, name)
    try:
        marker = json.loads((path / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker != _marker_content(_spec_by_name(name)):
        return False
    return all((path / filename).is_file() for filename in REQUIRED_FILES)


def build_local_models(
    cache_dir: Path, names: Iterable[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Builds the local models that are not already in the cache.

    Each model is built into a temporary directory inside ``cache_dir`` and
    renamed into place once complete, so a directory at ``cache_dir/<name>``
    never holds a partial build.

    Args:
        cache_dir: Root directory holding locally built models; created if
            missing.
        names: Names of the models to build; all of ``LOCAL_MODELS`` if None.
        force: Rebuild even if a complete build is already present.

    Returns:
        A mapping from model name to its directory.

    Raises:
        KeyError: If a name is not in ``LOCAL_MODELS``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cache_dir = Path(cache_dir)
    specs = LOCAL_MODELS if names is None else tuple(_spec_by_name(n) for n in names)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in specs:
        target = model_path(cache_dir, spec.name)
        if not force and is_built(cache_dir, spec.name):
            logger.debug("local model %s already built at %s", spec.name, target)
        else:
            _build_atomically(spec, cache_dir, target, force)
        paths[spec.name] = target
    return paths


def _build_atomically(spec: TinyModelSpec, cache_dir: Path, target: Path, force: bool) -> None:
    logger.info("building local model %s into %s", spec.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.building-", dir=cache_dir))
    try:
        staging.chmod(0o755)  # mkdtemp creates it owner-only.
        _build_model(spec, staging)
        if target.exists():
            if not force and is_built(cache_dir, spec.name):
                # Another process finished the same build first; keep theirs.
                return
            stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.stale-", dir=cache_dir))
            os.replace(target, stale / spec.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not is_built(cache_dir, spec.name):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_model(spec: TinyModelSpec, out_dir: Path) -> None:
    """Writes the tokenizer, weights, configs and build marker into ``out_dir``."""
    if spec.hidden_size % spec.num_heads or spec.head_dim != 64:
        raise ValueError(f"{spec.name}: head_dim must be 64, not {spec.hidden_size / spec.num_heads}")
    tokenizer = _build_tokenizer(spec)
    tokenizer.save_pretrained(out_dir)
    special_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    _build_weights(spec, special_ids, out_dir)
    marker = json.dumps(_marker_content(spec), indent=2, sort_keys=True) + "\n"
    (out_dir / BUILD_MARKER).write_text(marker, encoding="utf-8")


def _corpus(seed: int, num_lines: int) -> Iterator[str]:
    """Yields a deterministic mix of prose, chat, code, numbers and unicode lines."""
    rng = random.Random(seed)

    def pseudo_word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))

    def sentence() -> str:
        words = [
            rng.choice(_WORDS) if rng.random() < 0.8 else pseudo_word() for _ in range(rng.randint(4, 16))
        ]
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice(".?!.")

    def code_line() -> str:
        name, arg, other = pseudo_word(), rng.choice(_WORDS), pseudo_word()
        return rng.choice(
            (
                f"def {name}_{arg}({arg}, {other}=None):",
                f"    return {arg} + {rng.randint(0, 999)}",
                f"    {name} = [{rng.randint(0, 99)}, {rng.randint(0, 99)}, {rng.randint(0, 99)}]",
                f'{{"{name}": "{arg}", "count": {rng.randint(0, 10_000)}, "ok": true}}',
                f"if {arg} is not None and len({name}) > {rng.randint(1, 64)}:",
                f"class {name.capitalize()}{arg.capitalize()}:",
                f"for i in range({rng.randint(1, 100)}): {name}.append(i * {rng.random():.3f})",
                f"    # {sentence()}",
            )
        )

    def chat_line() -> str:
        role = rng.choice(("user", "assistant", "system"))
        return f"{role}: {sentence()} {sentence()}"

    def unicode_line() -> str:
        parts = [
            rng.choice(_UNICODE_SNIPPETS) if rng.random() < 0.5 else rng.choice(_WORDS)
            for _ in range(rng.randint(3, 10))
        ]
        return " ".join(parts)

    kinds = (sentence, sentence, sentence, code_line, code_line, chat_line, unicode_line)
    for _ in range(num_lines):
        yield rng.choice(kinds)()


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Disables the tokenizers library's thread pool, for a reproducible training."""
    saved = {key: os.environ.get(key) for key in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build_tokenizer(spec: TinyModelSpec):
    """Trains a byte-level BPE tokenizer and wraps it for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    with _serial_tokenizers():
        # About three corpus lines per token lets BPE fill (nearly) the whole vocabulary.
        tokenizer.train_from_iterator(_corpus(spec.seed, 3 * spec.vocab_size), trainer=trainer)
    if tokenizer.get_vocab_size() > spec.vocab_size:
        raise ValueError(f"{spec.name}: tokenizer has more tokens than vocab_size")
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    suffix = THINK_OPEN_TOKEN + "\\n" if spec.opens_think else ""
    wrapped.chat_template = _CHAT_TEMPLATE.replace("%GENERATION_SUFFIX%", suffix)
    return wrapped


def _build_weights(spec: TinyModelSpec, special_ids: dict[str, int], out_dir: Path) -> None:
    """Writes a seeded, randomly initialised Llama model and its configs."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=special_ids[BOS_TOKEN],
        eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[PAD_TOKEN],
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):  # Leaves the caller's RNG state untouched.
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids[BOS_TOKEN],
        eos_token_id=[special_ids[EOT_TOKEN], special_ids[EOS_TOKEN]],
        pad_token_id=special_ids[PAD_TOKEN],
    )
    model.save_pretrained(out_dir, safe_serialization=True)
