"""What a caller may ask of text generation, as values: the mode, the rule for skipped layers' keys and
values, and the settings of one ``Generator.generate`` call.

    from runtimes.genconfig import GenerationConfig, Mode
    gen.generate(image, config=GenerationConfig(mode=Mode.SPECULATIVE, draft_len=3))

Modes and KV rules are enums whose values are the strings the CLI and older callers use
(``Mode("exit") is Mode.EXIT``), so ``mode="exit"`` keeps working wherever a mode is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence, TypeVar

from runtimes.errors import ConfigError, InputError

__all__ = ["Mode", "KVRule", "GenerationConfig"]

E = TypeVar("E", bound=Enum)


class Mode(str, Enum):
    """How each token is decided."""

    EXIT = "exit"  # at the first exit whose confidence reaches its threshold (certified early exit)
    SPECULATIVE = "speculative"  # an exit drafts, the full model verifies: the full model's text
    FULL = "full"  # the monolithic decode step: the baseline

    @classmethod
    def parse(cls, value: "Mode | str") -> "Mode":
        return _member(cls, value, "mode")


class KVRule(str, Enum):
    """Where the keys and values of the layers an early-exited token skipped come from."""

    RECOMPUTE = "recompute"  # they wait; the next token that goes deeper carries them (exact rows)
    PROPAGATE = "propagate"  # at once, from the exited hidden state (CALM's state propagation; approximate)

    @classmethod
    def parse(cls, value: "KVRule | str") -> "KVRule":
        return _member(cls, value, "kv")


def _member(kind: type[E], value: object, what: str) -> E:
    """``value`` as a member of ``kind`` (a member, or its string); a ConfigError naming the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{what} must be one of {', '.join(m.value for m in kind)}, got {value!r}") from None


@dataclass(frozen=True)
class GenerationConfig:
    """The settings of one generation call; None means the bundle's (or calibration's) default."""

    mode: Mode = Mode.EXIT
    kv: KVRule = KVRule.RECOMPUTE  # mode EXIT only
    max_new_tokens: int | None = None  # None: as many as the model's positions leave
    thresholds: Sequence[float | None] | None = None  # mode EXIT: per exit; None: the runtime's
    draft_block: int | None = None  # mode SPECULATIVE: the block whose exit drafts; None: calibrated or the first
    draft_len: int | None = None  # mode SPECULATIVE: tokens drafted per verification; None: calibrated or 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        object.__setattr__(self, "kv", KVRule.parse(self.kv))
        for name in ("max_new_tokens", "draft_block", "draft_len"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                # how many tokens to write is part of the request (an InputError, as per row elsewhere)
                error = InputError if name == "max_new_tokens" else ConfigError
                raise error(f"{name} must be a positive integer or None, got {v!r}")
