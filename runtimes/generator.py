"""``Generator``: the runtime of a generative bundle: greedy text, token by token, with early exits.

    from runtimes import Runtime
    from runtimes.genconfig import GenerationConfig, Mode
    gen = Runtime.load("bundles/captions")                   # a Generator: the bundle's head is a DecoderHead
    gen.generate("digit.png", prompt="a photo of").text      # certified early exit (Mode.EXIT)
    gen.generate("digit.png", config=GenerationConfig(mode=Mode.SPECULATIVE)).text   # the full model's text

The decoding loop (``runtimes.decoding``) reads every graph and tensor from the plan; this class holds
the tokenizer, the decoding plan and the defaults calibration measured.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar

from runtimes import decoding
from runtimes.backends import Backend
from runtimes.bundle import Bundle, DecoderHead
from runtimes.errors import ConfigError, InputError
from runtimes.genconfig import GenerationConfig, KVRule, Mode
from runtimes.result import Generation
from runtimes.runtime import Runtime

__all__ = ["Generator", "DEFAULT_DRAFT_LEN"]

DEFAULT_DRAFT_LEN = 4  # drafts per verification where calibration measured nothing


class Generator(Runtime, task="generate"):
    # accepted so that one load() call serves either kind; a classifier's settings are refused here
    options: ClassVar[tuple[str, ...]] = ("policy", "nonfinite", "monitor")

    def __init__(self, bundle: Bundle, backend: Backend, policy: str = "per_sample", nonfinite: str = "error",
                 monitor: Any = None) -> None:
        self.check_options(bundle, policy=policy, nonfinite=nonfinite, monitor=monitor)
        super().__init__(bundle, backend)
        self.head: DecoderHead = bundle.expect(DecoderHead, "Generator")
        self._plan: Any = None  # the decoding plan and tokenizer, loaded on first use
        self._tokenizer: Any = None

    @classmethod
    def check_options(cls, bundle: Bundle, **options: Any) -> None:
        super().check_options(bundle, **options)
        if options.get("monitor") is not None:
            raise ConfigError(f"monitor= applies to classifier bundles; {bundle.name!r} generates text")
        if options.get("policy", "per_sample") != "per_sample" or options.get("nonfinite", "error") != "error":
            raise ConfigError(f"policy= and nonfinite= apply to classifier bundles; {bundle.name!r} generates text")

    def decoding(self) -> tuple[Any, Any]:
        """The decoding plan and the tokenizer, loaded on first use."""
        self._open()
        if self._plan is None:
            import tokenizers

            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.bundle.path(self.head.tokenizer_file)))
            self._plan = decoding.DecodePlan(self.bundle)
        return self._plan, self._tokenizer

    @property
    def exit_blocks(self) -> tuple[int, ...]:
        return tuple(e.block for e in self.bundle.exits)

    def speculative_defaults(self) -> tuple[int, int]:
        """Self-speculation's draft block and draft length: those ``freedeploy calibrate`` measured best for
        this backend and precision, else the first exit and ``DEFAULT_DRAFT_LEN`` drafts."""
        choice = getattr(self.certificate, "speculative", None)
        if choice is None:
            return self.exit_blocks[0], DEFAULT_DRAFT_LEN
        return int(choice.draft_block), int(choice.draft_len)

    def prompt_ids(self, prompt: str) -> list[int]:
        """BOS and the prompt's tokens."""
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        _, tok = self.decoding()
        words = tok.encode(prompt, add_special_tokens=False).ids if prompt.strip() else []
        return [self.head.bos_id, *words]

    def config(self, config: GenerationConfig | None = None, **legacy: Any) -> GenerationConfig:
        """``config``, or one made from keyword arguments (``mode=``, ``max_new_tokens=``, ...); ``draft_exit``
        (an exit's index) is the deprecated spelling of ``draft_block``."""
        if "draft_exit" in legacy:
            warnings.warn("draft_exit= (an exit's index) is deprecated: give draft_block= (the block of the exit "
                          "that drafts)", DeprecationWarning, stacklevel=3)
            index = legacy.pop("draft_exit")
            if index is not None:
                blocks = self.exit_blocks
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks):
                    raise ConfigError(f"draft_exit must be 0..{len(blocks) - 1}, got {index!r}")
                legacy["draft_block"] = blocks[index]
        given = {k: v for k, v in legacy.items() if v is not None}
        if config is not None and given:
            raise ConfigError(f"give config= or keyword settings, not both ({', '.join(sorted(given))})")
        try:
            return config if config is not None else GenerationConfig(**given)
        except TypeError as exc:
            raise ConfigError(f"generate() got an unknown setting: {exc}") from None

    def generate(self, image: Any, prompt: str = "", config: GenerationConfig | None = None, *,
                 max_new_tokens: int | None = None, mode: Mode | str | None = None,
                 thresholds: Any = None, draft_block: int | None = None, draft_len: int | None = None,
                 kv: KVRule | str | None = None, **deprecated: Any) -> Generation:
        """Greedy text for one image (and an optional prompt), to end-of-sequence.

        ``config.mode``: ``exit`` (each token leaves at the first exit whose confidence reaches its
        threshold, ``rt.thresholds`` unless given; the layers it skipped get their keys and values when the
        next token that goes deeper recomputes them, ``kv=recompute``, or at once from the exited hidden
        state, ``kv=propagate``), ``speculative`` (the exit at ``draft_block`` drafts ``draft_len`` tokens
        and the full model checks them in one call: the full model's text, faster when drafts are
        accepted) or ``full`` (the monolithic decode step). ``max_new_tokens`` defaults to what the model's
        positions leave; ``draft_block`` and ``draft_len`` to what calibration measured best
        (``speculative_defaults``). The settings come as one ``GenerationConfig`` or as keywords."""
        unknown = set(deprecated) - {"draft_exit"}
        if unknown:
            raise ConfigError(f"generate() takes no setting {', '.join(sorted(unknown))}")
        cfg = self.config(config, max_new_tokens=max_new_tokens, mode=mode, thresholds=thresholds,
                          draft_block=draft_block, draft_len=draft_len, kv=kv, **deprecated)
        plan, tok = self.decoding()
        ids = self.prompt_ids(prompt)
        max_new = self._max_new(cfg.max_new_tokens, len(ids))
        pixels = self.encode([image])[plan.image_input]
        t0 = time.perf_counter()
        out = self._decode(cfg, pixels, ids, max_new)
        seconds = time.perf_counter() - t0
        text_ids = [t for t in out.tokens if t != self.head.eos_id]
        return Generation(tok.decode(text_ids), tuple(out.tokens), tuple(out.blocks), cfg.mode.value, out.calls,
                          seconds, out.prefill_seconds, tuple(float(c) for c in out.confidences))

    def _max_new(self, asked: int | None, prompt: int) -> int:
        h = self.head
        room = h.max_positions - h.num_query_tokens - prompt
        max_new = room if asked is None else asked
        if not 1 <= max_new <= room:
            raise InputError(f"max_new_tokens must be 1..{room} for this prompt ({prompt} tokens; the model has "
                             f"{h.max_positions} positions, {h.num_query_tokens} of them for the image)")
        return max_new

    def _decode(self, cfg: GenerationConfig, pixels: Any, ids: list[int], max_new: int) -> Any:
        """One sample decoded in ``cfg.mode`` (``runtimes.decoding``)."""
        plan, _ = self.decoding()
        if cfg.mode is Mode.EXIT:
            th = self._thresholds if cfg.thresholds is None else self._checked(cfg.thresholds)
            return decoding.greedy_decode(self.backend, self.bundle, pixels, ids, max_new, th, plan, kv=cfg.kv)
        if cfg.mode is Mode.SPECULATIVE:
            block, length = self.speculative_defaults()
            block = block if cfg.draft_block is None else cfg.draft_block
            if block not in self.exit_blocks:
                raise ConfigError(f"draft_block must be the block of an exit ({', '.join(map(str, self.exit_blocks))}), "
                                  f"got {block}")
            return decoding.speculative_decode(self.backend, self.bundle, pixels, ids, max_new,
                                               draft_block=block,
                                               draft_len=length if cfg.draft_len is None else cfg.draft_len, plan=plan)
        return decoding.full_decode(self.backend, self.bundle, pixels, ids, max_new, plan)
