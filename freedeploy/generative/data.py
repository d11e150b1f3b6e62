"""From image-to-text rows to decoder inputs: the word-level tokenizer of the ``blip2-tiny`` preset
and the teacher-forcing batches.

A row is ``(image, prompt)`` with a target text (``analysis.captions``). The decoder reads

    ids    = [BOS] prompt tokens  target tokens  [EOS]  [PAD] ...
    labels = ids shifted left by one: the token each position predicts
    target_mask[i] = 1 where ids[i + 1] is a target token or [EOS]

so the logits at position ``i`` are trained to predict ``ids[i + 1]`` only where that token is part
of what the model must write (the prompt is given, never predicted). Decoding starts from
``prompt_ids(row)`` = ``[BOS] prompt tokens``.

**Length rule:** a row whose ``[BOS] + prompt + target + [EOS]`` is longer than ``max_length`` is a
``DataError`` naming the row (never silently truncated: a caption cut short would teach the model
to stop mid-sentence). Raise ``--max-length`` for such data.

Images go through the classifiers' own preprocessing (``runtimes.preprocess.encode_images`` with an
``ImageSpec``), so grayscale digits become 3 normalised channels at the model's input size.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtimes.errors import ConfigError, DataError
from runtimes.preprocess import ImageSpec, encode_images

__all__ = ["SPECIALS", "IMAGE_TOKEN", "DEFAULT_MAX_LENGTH", "SpecialIds", "learn_tokenizer", "tokenizer_ids",
           "CaptionEncoder"]

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")  # ids 0, 1, 2, 3, as blip2_tiny_config expects
IMAGE_TOKEN = "[IMG]"  # BLIP-2's image placeholder: the last id (image_token_index = vocab_size - 1)
DEFAULT_MAX_LENGTH = 32  # tokens per row, [BOS] and [EOS] included


@dataclass(frozen=True)
class SpecialIds:
    pad: int = 0
    bos: int = 1
    eos: int = 2
    image: int | None = None  # the image placeholder id, never part of the text a row encodes

    def to_dict(self) -> dict[str, Any]:
        return {"pad_id": self.pad, "bos_id": self.bos, "eos_id": self.eos, "image_token_id": self.image}


def learn_tokenizer(texts: Sequence[str]) -> Any:
    """A word-level tokenizer (lowercase, split on whitespace and punctuation) over the words of
    ``texts`` (the training rows' prompt and target): ``[PAD]`` 0, ``[BOS]`` 1, ``[EOS]`` 2,
    ``[UNK]`` 3, the words by falling frequency (ties alphabetical), and ``[IMG]`` last."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    norm, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    reserved = set(SPECIALS) | {IMAGE_TOKEN}
    words = sorted((w for w in counts if w not in reserved), key=lambda w: (-counts[w], w))
    if not words:
        raise DataError("no words to learn a tokenizer from: every training text is empty")
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *words, IMAGE_TOKEN))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.add_special_tokens([*SPECIALS, IMAGE_TOKEN])
    return tok


def tokenizer_ids(tok: Any) -> SpecialIds:
    """The special ids of a tokenizer :func:`learn_tokenizer` made."""
    ids = [tok.token_to_id(t) for t in (*SPECIALS, IMAGE_TOKEN)]
    if ids[:3] != [0, 1, 2] or ids[4] != tok.get_vocab_size() - 1:
        raise ConfigError("the tokenizer does not have [PAD]=0, [BOS]=1, [EOS]=2 and [IMG] last")
    return SpecialIds(pad=0, bos=1, eos=2, image=ids[4])


class CaptionEncoder:
    """Teacher-forcing arrays for rows of an image-to-text data set; the images are encoded once.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; its own post-processing is not used (the special
    ids are placed here)."""

    def __init__(self, items: Sequence[Any], targets: Sequence[str], image_spec: ImageSpec, tokenizer: Any,
                 special: SpecialIds, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if len(items) != len(targets):
            raise DataError(f"{len(items)} rows but {len(targets)} target texts")
        self.image_spec, self.tokenizer, self.special, self.max_length = image_spec, tokenizer, special, max_length
        self._items, self._targets = list(items), list(targets)
        self._pixels: np.ndarray | None = None
        self._prompts: list[list[int] | None] = [None] * len(items)
        self._targets_ids: list[list[int] | None] = [None] * len(items)

    @classmethod
    def for_run(cls, run_dir: Path, manifest: dict[str, Any], data: Any) -> "CaptionEncoder":
        """The encoder a generative run dir was trained with, rebuilt from its files, over ``data``."""
        import tokenizers

        from runtimes.preprocess import spec_from_dict

        pre = manifest["preprocess"]
        special = SpecialIds(pad=int(pre["pad_id"]), bos=int(pre["bos_id"]), eos=int(pre["eos_id"]),
                             image=pre.get("image_token_id"))
        tokenizer = tokenizers.Tokenizer.from_file(str(Path(run_dir) / pre["tokenizer_file"]))
        return cls(data.items, data.targets, spec_from_dict(pre["image"]), tokenizer, special, int(pre["max_length"]))

    def __len__(self) -> int:
        return len(self._items)

    # -- text ----------------------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else []

    def _split(self, i: int) -> tuple[list[int], list[int]]:
        if self._prompts[i] is None:
            prompt, target = self._items[i][1] or "", self._targets[i]
            p = self._tokens(prompt)
            if prompt:
                # the target as it follows the prompt (matters to sub-word tokenizers that mark a
                # word's leading space): the tokens of the whole text that end past the prompt
                enc = self.tokenizer.encode(f"{prompt} {target}", add_special_tokens=False)
                t = [tid for tid, (_, end) in zip(enc.ids, enc.offsets) if end > len(prompt)]
            else:
                t = self._tokens(target)
            if not t:
                raise DataError(f"row {i}: the target text {target!r} has no tokens")
            n = 2 + len(p) + len(t)
            if n > self.max_length:
                raise DataError(f"row {i}: [BOS] + prompt + target + [EOS] is {n} tokens, more than the "
                                f"maximum length {self.max_length}; raise --max-length")
            self._prompts[i], self._targets_ids[i] = p, t
        return self._prompts[i], self._targets_ids[i]  # type: ignore[return-value]

    def prompt_ids(self, i: int) -> list[int]:
        """What decoding row ``i`` starts from: ``[BOS]`` and the prompt's tokens."""
        return [self.special.bos, *self._split(i)[0]]

    def target_ids(self, i: int) -> list[int]:
        """What decoding row ``i`` should write: the target's tokens and ``[EOS]``."""
        return [*self._split(i)[1], self.special.eos]

    def text(self, indices: Sequence[int], trim: bool = True) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask``, ``labels`` (the next token) and ``target_mask``, all
        (B, T) int64; T is ``max_length``, or the longest row of the batch with ``trim``."""
        b = len(indices)
        ids = np.full((b, self.max_length), self.special.pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        target = np.zeros_like(ids)
        longest = 1
        for r, i in enumerate(indices):
            p, t = self._split(int(i))
            row = [self.special.bos, *p, *t, self.special.eos]
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
            target[r, len(p):len(row) - 1] = 1  # positions whose next token is a target token or [EOS]
            longest = max(longest, len(row))
        labels = np.full_like(ids, self.special.pad)
        labels[:, :-1] = ids[:, 1:]
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "target_mask": target}
        return {k: v[:, :longest] for k, v in out.items()} if trim else out

    # -- images --------------------------------------------------------------------------------------
    def pixels(self, indices: Sequence[int]) -> np.ndarray:
        """float32 (B, C, H, W) ``pixel_values``."""
        if self._pixels is None:
            self._pixels = _encode_unique([item[0] for item in self._items], self.image_spec)
        return self._pixels[np.asarray(indices, dtype=np.int64)]

    def __call__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        if len(indices) == 0:
            raise DataError("an empty batch was requested")
        return {"pixel_values": self.pixels(indices), **self.text(indices)}

    def check(self, indices: Sequence[int] | None = None) -> None:
        """Tokenise rows now (every row when ``indices`` is None), so a too-long text fails before training."""
        for i in range(len(self)) if indices is None else indices:
            self._split(int(i))


def _encode_unique(images: Sequence[Any], spec: ImageSpec) -> np.ndarray:
    """Encode each distinct image once (a captions set repeats an image for each of its texts)."""
    keys, first, order = {}, [], np.empty(len(images), dtype=np.int64)
    for i, img in enumerate(images):
        key = ("path", str(img)) if isinstance(img, (str, Path)) else ("id", id(img))
        if key not in keys:
            keys[key] = len(first)
            first.append(img)
        order[i] = keys[key]
    return encode_images(spec, first)[spec.input_name][order]
