"""The ``--data`` SPEC string: ``KIND[:GLOB][,KEY=VALUE...]`` parsed and checked.

Every refusal is a ValueError naming the spec and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import os

_KINDS = ("stdlib", "text", "jsonl", "npy")
_OPTIONS = {
    "stdlib": {"holdout", "shard"},
    "text": {"tokenizer", "holdout", "eval", "shard"},
    "jsonl": {"tokenizer", "field", "holdout", "eval", "shard"},
    "npy": {"sep", "holdout", "eval", "shard"},
}
_SHARDS = ("process", "global")
DEFAULT_HOLDOUT = 0.02


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` SPEC."""

    kind: str
    pattern: str | None = None
    tokenizer: str | None = None  # a tokenizer.json path, or "bytes"
    field: str = "text"
    holdout: float = DEFAULT_HOLDOUT
    eval_pattern: str | None = None
    sep: int | None = None
    # process: each process reads its own files (scales with hosts); global: every process
    # builds the whole global batch and keeps its rows (the stream does not depend on the
    # process count, at the cost of every host reading everything).
    shard: str = "process"


def relative_paths(spec: DataSpec) -> list[str]:
    """The spec's file paths (globs, tokenizer) that are relative to the current directory."""
    paths = (spec.pattern, spec.eval_pattern, None if spec.tokenizer == "bytes" else spec.tokenizer)
    return [p for p in paths if p is not None and not os.path.isabs(p)]


def parse_spec(spec: str) -> DataSpec:
    """Parses a SPEC string; raises ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    head, *opts = [p.strip() for p in spec.strip().split(",")]
    kind, colon, pattern = head.partition(":")
    kind = kind.strip()
    if kind not in _KINDS:
        raise ValueError(
            f"data spec {spec!r}: unknown source {kind!r}; expected one of "
            "stdlib, text:GLOB, jsonl:GLOB, npy:GLOB"
        )
    if kind == "stdlib":
        if colon:
            raise ValueError(f"data spec {spec!r}: 'stdlib' takes no ':GLOB'")
        pattern = None
    elif not pattern:
        raise ValueError(f"data spec {spec!r}: '{kind}:' needs a file GLOB after the colon")

    values: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"data spec {spec!r}: option {opt!r} is not KEY=VALUE")
        if key not in _OPTIONS[kind]:
            allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
            raise ValueError(
                f"data spec {spec!r}: option {key!r} does not apply to '{kind}' "
                f"(allowed: {allowed})"
            )
        if key in values:
            raise ValueError(f"data spec {spec!r}: option {key!r} given twice")
        values[key] = value

    holdout = DEFAULT_HOLDOUT
    if "holdout" in values:
        try:
            holdout = float(values["holdout"])
        except ValueError:
            raise ValueError(
                f"data spec {spec!r}: holdout={values['holdout']!r} is not a number"
            ) from None
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"data spec {spec!r}: holdout must be in [0, 1), got {holdout}")
    if "eval" in values and "holdout" in values:
        raise ValueError(f"data spec {spec!r}: give either eval=GLOB or holdout=, not both")

    sep = None
    if "sep" in values:
        try:
            sep = int(values["sep"])
        except ValueError:
            raise ValueError(f"data spec {spec!r}: sep={values['sep']!r} is not an integer") from None
        if sep < 0:
            raise ValueError(f"data spec {spec!r}: sep must be a token id >= 0")

    shard = values.get("shard", "process")
    if shard not in _SHARDS:
        raise ValueError(f"data spec {spec!r}: shard={shard!r}; expected one of {', '.join(_SHARDS)}")

    tokenizer = values.get("tokenizer")
    if kind in ("text", "jsonl") and tokenizer is None:
        raise ValueError(
            f"data spec {spec!r}: '{kind}' data needs tokenizer=PATH/to/tokenizer.json "
            "(or tokenizer=bytes for byte-level tokens, vocab 256)"
        )
    if tokenizer not in (None, "bytes"):
        tokenizer = os.path.expanduser(tokenizer)
        if os.path.isdir(tokenizer):  # a model folder: its tokenizer.json
            inside = os.path.join(tokenizer, "tokenizer.json")
            if not os.path.isfile(inside):
                raise ValueError(f"data spec {spec!r}: tokenizer folder {tokenizer!r} has no "
                                 f"tokenizer.json")
            tokenizer = inside
        elif not os.path.isfile(tokenizer):
            raise ValueError(f"data spec {spec!r}: tokenizer file {tokenizer!r} does not exist")

    return DataSpec(
        kind=kind,
        pattern=os.path.expanduser(pattern) if pattern else None,
        tokenizer=tokenizer,
        field=values.get("field", "text"),
        holdout=holdout,
        eval_pattern=os.path.expanduser(values["eval"]) if "eval" in values else None,
        sep=sep,
        shard=shard,
    )
