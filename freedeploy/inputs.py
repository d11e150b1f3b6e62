"""From a data set and a backbone to model inputs: the preprocessing spec and encoded batches.

The spec is decided once, here, and recorded in the run dir; the same ``runtimes.preprocess``
functions then encode inputs for training, export validation, calibration and the runtime.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.data import Dataset
from freedeploy.backbones import Backbone
from runtimes.errors import ConfigError, DataError
from runtimes.preprocess import ImageSpec, ImageTextSpec, Spec, TextEncoder, TextSpec, make_encoder, spec_from_dict

__all__ = ["make_preprocess", "Encoder", "TOKENIZER_FILE"]

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CACHE_LIMIT_BYTES = 512 * 2**20  # encode a whole data set once when it fits in this much memory


def make_preprocess(backbone: Backbone, data: Dataset, train_idx: np.ndarray, out_dir: Path,
                    max_length: int | None) -> Spec:
    """Decide the preprocessing spec; for models that read text, write the tokenizer into ``out_dir``."""
    if backbone.adapter.modality != data.modality:
        raise ConfigError(f"model {backbone.source!r} takes {backbone.adapter.modality} inputs but data "
                          f"set {data.spec!r} holds {data.modality}")
    if data.modality == "image" and max_length is not None:
        raise ConfigError("--max-length applies to text models only (and to the questions of image-text models)")
    if backbone.preprocess is not None and max_length is None:  # an earlier run's spec, reused as is
        if data.modality != "image":
            _write_tokenizer(backbone, [], out_dir / TOKENIZER_FILE)
        return spec_from_dict(backbone.preprocess)
    if data.modality == "image":
        return _image_spec(backbone)
    if data.modality == "text":
        return _text_spec(backbone, [data.items[i] for i in train_idx], out_dir, max_length)
    questions = [data.items[i][1] for i in train_idx]  # image-text items are (image, question) pairs
    return ImageTextSpec(_image_spec(backbone), _text_spec(backbone, questions, out_dir, max_length))


def _image_spec(backbone: Backbone) -> ImageSpec:
    config = getattr(backbone.hf.config, "vision_config", backbone.hf.config)
    size = int(config.image_size)
    d = backbone.image_defaults
    return ImageSpec(size=tuple(d.get("size", (size, size))), mean=tuple(d.get("mean", (0.5, 0.5, 0.5))),
                     std=tuple(d.get("std", (0.5, 0.5, 0.5))), channels=int(config.num_channels))


def _text_spec(backbone: Backbone, texts: list[str], out_dir: Path, max_length: int | None) -> TextSpec:
    tok = _write_tokenizer(backbone, texts, out_dir / TOKENIZER_FILE)
    pad_id = tok.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else int(pad_id)
    limit = int(backbone.hf.config.max_position_embeddings)
    if max_length is None:
        probe = TextSpec(TOKENIZER_FILE, max_length=limit, pad_id=pad_id)
        lengths = TextEncoder(probe, out_dir).lengths(texts)
        # the 99th percentile, rounded up to a multiple of 8: long tails are truncated, not padded for
        max_length = min(limit, max(8, int(math.ceil(np.percentile(lengths, 99) / 8.0) * 8)))
        log.info("max length %d tokens (99th percentile of training texts, capped at %d)", max_length, limit)
    elif not 2 <= max_length <= limit:
        raise ConfigError(f"--max-length must be in 2..{limit} for this model, got {max_length}")
    return TextSpec(TOKENIZER_FILE, max_length=max_length, pad_id=pad_id)


def _write_tokenizer(backbone: Backbone, texts: Sequence[str], path: Path) -> Any:
    """The model's own tokenizer; presets get a WordPiece vocabulary learnt from the training texts."""
    from tokenizers import Tokenizer

    if backbone.tokenizer_dir is not None:
        src = Path(backbone.tokenizer_dir) / TOKENIZER_FILE
        if src.is_file():
            path.write_bytes(src.read_bytes())
        else:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(backbone.tokenizer_dir).backend_tokenizer.save(str(path))
        return Tokenizer.from_file(str(path))
    tok = _train_wordpiece(texts, vocab_size=int(backbone.hf.config.vocab_size))
    tok.save(str(path))
    return tok


def _train_wordpiece(texts: Sequence[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


class Encoder:
    """Encoded inputs for rows of a data set, cached whole when the data set is small."""

    def __init__(self, data: Dataset, spec: Spec, spec_dir: Path) -> None:
        self.data, self.spec = data, spec
        self._encode = make_encoder(spec, spec_dir)
        row_bytes = _row_bytes(spec)
        self._cache: dict[str, np.ndarray] | None = None
        if row_bytes * len(data) <= CACHE_LIMIT_BYTES:
            self._cache = self._encode(data.items)

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if len(indices) == 0:
            raise DataError("an empty batch was requested")
        if self._cache is not None:
            return {k: v[indices] for k, v in self._cache.items()}
        return self._encode([self.data.items[i] for i in indices])


def _row_bytes(spec: Spec) -> int:
    """Memory of one encoded row: float32 pixels, int64 token ids and mask."""
    if isinstance(spec, ImageTextSpec):
        return _row_bytes(spec.image) + _row_bytes(spec.text)
    return 4 * int(np.prod(spec.size)) * spec.channels if isinstance(spec, ImageSpec) else 16 * spec.max_length
