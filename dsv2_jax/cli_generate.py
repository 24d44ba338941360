"""`dsv2 generate`: continue a prompt with a ported or trained model, printing tokens as they
come.

Streaming uses `generate`'s `on_token` hook: the compiled decode loop calls back to the host
once per step (a `jax.debug.callback`), so the whole continuation is still one dispatch and
one compile, and each token is printed the moment it is chosen. Generating in chunks of k
steps would print in bursts of k and cost a dispatch (and a cache round trip) per chunk.

Tokenizer, in order: DIR/tokenizer.json; for a training workdir, the tokenizer its run.json
data spec names (`tokenizer=PATH`, or byte-level for `stdlib` / `tokenizer=bytes`); byte-level
for any model with vocab_size 256 (what the built-in corpus trains: token = UTF-8 byte);
`--tokenizer PATH` overrides them. With none, `--prompt` is refused and the output is printed
as ids; a run whose data tokenizer is not found from here is refused (not read as bytes). A `--prompt` starts with the
config's bos_token_id where DIR/tokenizer_config.json says `"add_bos_token": true` (as the
DeepSeek-V2 releases do and HF tokenizers honour); `--ids` are used exactly as given.
"""

from __future__ import annotations

import codecs
import json
import os
import sys


def add_cli(sub) -> None:
    from dsv2_jax.cache import CACHE_KINDS

    from dsv2_jax.cli import HelpFormatter

    p = sub.add_parser("generate", help="continue a prompt, printing tokens as they come",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="HF directory, dsv2 Orbax checkpoint or training workdir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs DIR/tokenizer.json or a byte-level model)")
    src.add_argument("--ids", help="prompt token ids, comma-separated: 1,2,3")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json for --prompt (default: the model's, see above)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens "
                   "whose probability reaches p, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--eos-id", default=None,
                   help="stop token id(s), comma-separated (default: the config's eos_token_id, "
                        "every one of a list)")
    p.add_argument("--cache-dtype", default=None, choices=CACHE_KINDS,
                   help="latent cache storage (default: the compute dtype)")
    p.set_defaults(func=run)


class ByteTokenizer:
    """Token i is the byte i: what `dsv2 train` feeds the model for the built-in corpus."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def stream_decoder(self):
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda new_ids: dec.decode(bytes(new_ids))


class FileTokenizer:
    """A `tokenizers` tokenizer.json."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception
            raise ValueError(f"cannot load tokenizer {path!r}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def stream_decoder(self):
        # Tokens need not decode one by one (merged bytes, leading-space markers): decode
        # everything so far and print what is new, holding back a trailing partial character.
        ids: list[int] = []
        shown = [0]

        def feed(new_ids):
            ids.extend(new_ids)
            text = self.tok.decode(ids)
            if text.endswith("\ufffd"):
                return ""
            out, shown[0] = text[shown[0]:], len(text)
            return out

        return feed


def load_tokenizer(model_dir: str, vocab_size: int):
    """The tokenizer of a model directory (see the module docstring), or None."""
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):
        return FileTokenizer(path)
    run_json = os.path.join(model_dir, "run.json")
    if os.path.isfile(run_json):
        from dsv2_jax.train.data import parse_spec

        try:
            with open(run_json) as f:
                data = json.load(f).get("data")
        except (ValueError, OSError, AttributeError):
            data = None  # unreadable: as if absent
        spec = None
        if isinstance(data, str):
            try:
                spec = parse_spec(data)
            except ValueError as e:  # its tokenizer has moved (or a relative path from elsewhere)
                raise ValueError(f"{model_dir} was trained on --data {data!r}, whose tokenizer is not "
                                 f"found from here ({e}); give --tokenizer PATH, copy it to "
                                 f"{path}, or give --ids") from None
        if spec is not None and (spec.kind == "stdlib" or spec.tokenizer == "bytes"):
            return ByteTokenizer()
        if spec is not None and spec.tokenizer:
            return FileTokenizer(spec.tokenizer)
    if vocab_size == 256:
        return ByteTokenizer()
    return None


def _parse_ids(text: str, flag: str = "--ids") -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if parts == [""]:
        if flag != "--ids":
            raise ValueError(f"{flag} {text!r}: expected comma-separated integers like 1,2")
        return []
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers like 1,2,3") from None


def adds_bos(model_dir: str) -> bool:
    """Whether text prompts start with BOS: tokenizer_config.json's `add_bos_token` (HF's
    convention; absent or unreadable: no)."""
    try:
        with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
            return json.load(f).get("add_bos_token") is True
    except (OSError, ValueError, AttributeError):
        return False


def run(a) -> int:
    # Flags are checked before the (slow) model load; generate checks them again.
    if a.prompt is not None and not a.prompt:
        raise ValueError("empty prompt: give --prompt TEXT with at least one character")
    ids = _parse_ids(a.ids) if a.ids is not None else None
    echo_from = 0  # the prompt's first id the echo shows (1: past an added BOS)
    if ids is not None and not ids:
        raise ValueError("empty prompt: --ids needs at least one token id")
    if not a.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {a.temperature}")
    if not 0.0 < a.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: off), got {a.top_k}")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not os.path.isdir(a.model):
        raise FileNotFoundError(f"--model {a.model!r}: no such directory")

    import numpy as np

    from dsv2_jax import from_pretrained
    from dsv2_jax.generation import check_inputs, generate

    model = from_pretrained(a.model)
    cfg = model.cfg
    if a.tokenizer:
        tok = FileTokenizer(os.path.expanduser(a.tokenizer))
    else:
        try:
            tok = load_tokenizer(a.model, cfg.vocab_size)
        except ValueError:
            if ids is None:  # a --prompt needs it
                raise
            tok = None  # --ids: the output is printed as ids
    if ids is None:
        if tok is None:
            raise ValueError(f"{a.model}: no tokenizer.json and vocab_size {cfg.vocab_size} is not "
                             f"byte-level; give --ids instead of --prompt")
        ids = tok.encode(a.prompt)
        if not ids:
            raise ValueError("empty prompt: the text encodes to no tokens")
        bos = cfg.bos_token_id
        if bos is not None and adds_bos(a.model) and ids[0] != bos:
            ids, echo_from = [bos] + ids, 1  # the echo shows the text, not the BOS
    eos = _parse_ids(a.eos_id, "--eos-id") if a.eos_id is not None else None
    if eos is None:
        eos = [e for e in cfg.eos_token_ids if 0 <= e < cfg.vocab_size] or None
    # Every argument checked before anything is printed (the echo would decode bad ids).
    check_inputs(cfg, np.asarray([ids]), np.asarray([len(ids)]), a.max_new_tokens, a.temperature,
                 a.top_k, a.top_p, eos)

    out = sys.stdout
    if tok is None:
        out.write(" ".join(map(str, ids)))
        show = lambda new: " " + " ".join(map(str, new))
    else:
        show = tok.stream_decoder()
        out.write(show(ids[echo_from:]))
    out.flush()

    def on_token(step, tokens, done):
        if not done[0]:
            out.write(show([int(tokens[0])]))
            out.flush()

    generate(model, [ids], a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
             seed=a.seed, eos_id=eos, cache_dtype=a.cache_dtype, on_token=on_token)
    out.write("\n")
    out.flush()
    return 0
