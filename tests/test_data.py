"""Tests for the training data pipeline (dsv2_jax/train/data/): real grain, real Orbax."""

import json
import os
import time

import grain
import numpy as np
import pytest

from dsv2_jax.train import data
from dsv2_jax.train.data import corpus, mixer, pipeline

KEYS = set(data.BATCH_KEYS)


# ----------------------------------------------------------------------- helpers


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _write_npy_docs(tmp_path, n_docs, seed=0, min_len=2, max_len=40):
    """Doc i holds tokens i*1000 + 0, 1, 2, ...: a token names its doc and place."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "npy"
    d.mkdir()
    for i in range(n_docs):
        n = int(rng.integers(min_len, max_len + 1))
        np.save(d / f"doc{i:03d}.npy", (i * 1000 + np.arange(n)).astype(np.int32))
    return d


def _check_invariants(batch, seq_len):
    """Every counted target is the next token of the same document (npy naming)."""
    x, y = batch["inputs"], batch["targets"]
    seg, pos, m = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    assert all(v.dtype == np.int32 for v in batch.values())
    assert x.shape == y.shape == seg.shape == pos.shape == m.shape
    assert x.shape[1] == seq_len
    for r in range(x.shape[0]):
        for j in range(seq_len):
            if seg[r, j] == 0:  # padding
                assert m[r, j] == 0 and x[r, j] == 0 and pos[r, j] == 0
                continue
            if j > 0 and seg[r, j] == seg[r, j - 1]:
                assert pos[r, j] == pos[r, j - 1] + 1
                assert x[r, j] == x[r, j - 1] + 1  # same document, next token
                assert x[r, j] // 1000 == x[r, j - 1] // 1000
            else:
                assert pos[r, j] == 0
                # a segment starts at a document start or a seq_len chunk boundary
                assert (x[r, j] % 1000) % seq_len == 0
            if m[r, j]:
                assert y[r, j] == x[r, j] + 1
        # segment ids are 1, 2, ... in order, then padding
        ids = seg[r][seg[r] > 0]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)


def _doc_ids(batches):
    out = set()
    for b in batches:
        out.update((b["inputs"][b["segment_ids"] > 0] // 1000).tolist())
    return out


# ------------------------------------------------------------------------- specs


def test_parse_spec_accepts_the_documented_forms(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    assert data.parse_spec("stdlib") == data.DataSpec(kind="stdlib")
    s = data.parse_spec(f"jsonl:{tmp_path}/*.jsonl, tokenizer={tok}, field=body, holdout=0.1")
    assert (s.kind, s.pattern, s.tokenizer, s.field, s.holdout) == (
        "jsonl", f"{tmp_path}/*.jsonl", str(tok), "body", 0.1)
    s = data.parse_spec("npy:a/*.npy,sep=0,eval=b/*.npy")
    assert (s.kind, s.sep, s.eval_pattern) == ("npy", 0, "b/*.npy")
    assert data.parse_spec("text:x/*.txt,tokenizer=bytes").tokenizer == "bytes"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "non-empty"),
        ("parquet:x", "unknown source"),
        ("stdlib:x", "takes no"),
        ("text:", "needs a file GLOB"),
        ("text:*.txt", "tokenizer="),
        ("jsonl:*.jsonl,tokenizer=/no/such/tokenizer.json", "does not exist"),
        ("npy:*.npy,field=text", "does not apply"),
        ("stdlib,tokenizer=bytes", "does not apply"),
        ("npy:*.npy,sep=eos", "not an integer"),
        ("npy:*.npy,sep=-1", ">= 0"),
        ("npy:*.npy,holdout=1.5", "[0, 1)"),
        ("npy:*.npy,holdout=x", "not a number"),
        ("npy:*.npy,sep", "KEY=VALUE"),
        ("npy:*.npy,sep=1,sep=2", "twice"),
        ("npy:*.npy,holdout=0.1,eval=x", "not both"),
        ("npy:*.npy,holdout=1", "[0, 1)"),  # everything held out: nothing to train on
        ("npy:*.npy,shard=host", "shard='host'"),
    ],
)
def test_bad_specs_raise_a_clear_error(spec, words):
    with pytest.raises(ValueError, match=None) as e:
        data.parse_spec(spec)
    assert words in str(e.value)
    with pytest.raises(ValueError):
        data.make_train_iter(spec, seq_len=8, batch_size=2, seed=0,
                             process_index=0, process_count=1)


def test_bad_data_raises_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no files match"):
        data.make_train_iter(f"npy:{tmp_path}/*.npy", seq_len=8, batch_size=2, seed=0,
                             process_index=0, process_count=1)
    np.save(tmp_path / "two_d.npy", np.zeros((2, 3), np.int32))
    it = data.make_train_iter(f"npy:{tmp_path}/*.npy,holdout=0", seq_len=8, batch_size=2,
                              seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="1-D integer array"):
        next(it)
    (tmp_path / "two_d.npy").unlink()
    for i in range(3):  # documents of one token have no target
        np.save(tmp_path / f"one{i}.npy", np.array([7], np.int32))
    it = data.make_train_iter(f"npy:{tmp_path}/*.npy,holdout=0", seq_len=8, batch_size=2,
                              seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no documents with 2 or more tokens"):
        next(it)
    with pytest.raises(ValueError, match="vocab_size is 100"):
        data.make_train_iter("stdlib", seq_len=8, batch_size=2, seed=0, vocab_size=100,
                             process_index=0, process_count=1)
    with pytest.raises(ValueError, match="vocab_size is 255"):  # byte 255 would not fit
        data.make_train_iter("stdlib", seq_len=8, batch_size=2, seed=0, vocab_size=255,
                             process_index=0, process_count=1)


# ----------------------------------------------------------------------- packing


def test_packing_matches_a_hand_built_example(tmp_path):
    np.save(tmp_path / "a.npy", np.array([10, 11, 12]))
    np.save(tmp_path / "b.npy", np.arange(20, 26))
    np.save(tmp_path / "c.npy", np.array([30, 31]))
    spec = f"npy:{tmp_path}/*.npy,eval={tmp_path}/*.npy"
    batches = list(data.make_eval_iter(spec, seq_len=4, batch_size=2))
    assert len(batches) == 2
    got = {k: np.concatenate([b[k] for b in batches]) for k in KEYS}
    # Documents a (3 tokens), b (6 tokens: cut at 4), c (2); first-fit into rows of 4.
    want = {
        "inputs":      [[10, 11, 12, 0], [20, 21, 22, 23], [24, 25, 30, 31], [0, 0, 0, 0]],
        "targets":     [[11, 12, 0, 0], [21, 22, 23, 24], [25, 0, 31, 0], [0, 0, 0, 0]],
        "segment_ids": [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 2, 2], [0, 0, 0, 0]],
        "positions":   [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 0, 0]],
        "loss_mask":   [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]],
        "num_bytes":   [0, 0, 0, 0],  # unknown for pre-tokenised data
    }
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], np.array(v, np.int32), err_msg=k)
        assert got[k].dtype == np.int32


def test_eval_files_named_through_a_symlink_are_still_kept_out_of_training(tmp_path):
    """eval=GLOB names files by another path than the training glob (a linked folder): they
    are the same files, so training must not read them (comparing path strings had kept
    them in the training set)."""
    (tmp_path / "d").mkdir()
    for i in range(4):
        np.save(tmp_path / "d" / f"n{i}.npy", np.arange(50) + i)
    os.symlink(tmp_path / "d", tmp_path / "link")
    for eval_glob in (f"{tmp_path}/d/n0.npy", f"{tmp_path}/link/n0.npy"):
        spec = f"npy:{tmp_path}/d/*.npy,eval={eval_glob}"
        c = corpus.Corpus(data.parse_spec(spec), 128, spec)
        assert [os.path.basename(f) for f in c.train_files] == ["n1.npy", "n2.npy", "n3.npy"], eval_glob


def test_training_rows_are_shuffled_when_packed_eval_rows_are_not():
    """Packing fills several bins at once and emits them together: with a seed (training)
    the rows of each flush come in a seeded order, without one (evaluation) in fill order.
    Unshuffled, the rows of a batch follow the piece stream (a long document's chunks in
    neighbouring rows, always in the same places)."""
    import grain

    rng = np.random.default_rng(0)
    pieces = []
    for i in range(1, 25):
        t = (i * 1000 + np.arange(rng.integers(2, 9))).astype(np.int32)
        pieces.append({"inputs": t, "targets": t, "loss_mask": np.ones(len(t), np.int32),
                       "target_bytes": np.zeros(len(t), np.int32)})

    def rows(seed):
        it = iter(pipeline.pack(grain.MapDataset.source(pieces).to_iter_dataset(), 8, bins=4, seed=seed))
        return [tuple(np.unique(r["inputs"][r["inputs"] > 0] // 1000)) for r in _take(it, 8)]

    fill = rows(None)
    assert rows(None) == fill
    seeded = {s: rows(s) for s in range(4)}
    assert all(rows(s) == seeded[s] for s in (0, 2))  # deterministic per seed
    for got in seeded.values():  # the same rows within each flush of 4 bins
        assert sorted(got[:4]) == sorted(fill[:4]) and sorted(got[4:]) == sorted(fill[4:])
    assert sum(got != fill for got in seeded.values()) >= 3, seeded
    assert len({tuple(got) for got in seeded.values()}) >= 3, seeded


def test_training_batches_never_cross_documents(tmp_path):
    d = _write_npy_docs(tmp_path, 30, max_len=50)
    it = data.make_train_iter(f"npy:{d}/*.npy,holdout=0", seq_len=16, batch_size=4, seed=3,
                              process_index=0, process_count=1)
    for _ in range(40):
        b = next(it)
        assert set(b) == KEYS
        assert b["num_bytes"].shape == (4,)
        _check_invariants(b, 16)


def test_stdlib_batches_are_byte_level_and_fast():
    t0 = time.perf_counter()
    it = data.make_train_iter("stdlib", seq_len=128, batch_size=4, seed=0, vocab_size=256,
                              process_index=0, process_count=1)
    b = next(it)
    first = time.perf_counter() - t0
    assert first < 10.0, f"first stdlib batch took {first:.1f}s"
    assert b["inputs"].shape == (4, 128) and b["inputs"].max() < 256
    # byte-level: every counted target is one byte
    np.testing.assert_array_equal(b["num_bytes"], b["loss_mask"].sum(1))
    same = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]) & (b["segment_ids"][:, 1:] > 0)
    np.testing.assert_array_equal(b["targets"][:, :-1][same], b["inputs"][:, 1:][same])


def test_stdlib_held_out_split_is_disjoint_and_deterministic():
    stdlib = corpus.Corpus(data.parse_spec("stdlib"), 256, "stdlib")
    train, held = set(stdlib.train_files), set(stdlib.eval_files)
    assert train and held and not train & held
    assert not any("site-packages" in f.split(os.sep) for f in train | held)
    assert 0.005 < len(held) / len(train | held) < 0.05
    again = corpus.Corpus(data.parse_spec("stdlib"), 256, "stdlib")
    assert again.eval_files == stdlib.eval_files and again.train_files == stdlib.train_files
    # eval batches come from held-out files only: their bytes occur in a held-out file
    first = next(iter(data.make_eval_iter("stdlib", seq_len=64, batch_size=1, max_batches=1)))
    row = first["inputs"][0][first["segment_ids"][0] == 1].astype(np.uint8).tobytes()
    with open(sorted(held)[0], "rb") as f:
        assert f.read().startswith(row)
    assert len(list(data.make_eval_iter("stdlib", seq_len=64, batch_size=2, max_batches=3))) == 3


def test_user_data_held_out_split_is_disjoint(tmp_path):
    d = _write_npy_docs(tmp_path, 60)
    spec = f"npy:{d}/*.npy,holdout=0.2"
    held = _doc_ids(data.make_eval_iter(spec, seq_len=32, batch_size=4))
    it = data.make_train_iter(spec, seq_len=32, batch_size=4, seed=0,
                              process_index=0, process_count=1)
    train = _doc_ids(_take(it, 60))
    assert held and train and not held & train
    assert held | train == set(range(60))


def test_jsonl_held_out_split_is_per_document(tmp_path):
    # one file of many documents: the split is by document (file:line), not by file
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"text": f"<{i:03d}> " + "x" * (i % 7)}) + "\n")
    spec = f"jsonl:{tmp_path}/*.jsonl,tokenizer=bytes,holdout=0.25"

    def ids(batches):
        out = set()
        for b in batches:
            for r in range(b["inputs"].shape[0]):
                for s in range(1, b["segment_ids"][r].max() + 1):
                    text = b["inputs"][r][b["segment_ids"][r] == s].astype(np.uint8).tobytes()
                    out.add(int(text[1:4]))
        return out

    held = ids(data.make_eval_iter(spec, seq_len=32, batch_size=4))
    it = data.make_train_iter(spec, seq_len=32, batch_size=4, seed=0,
                              process_index=0, process_count=1)
    train = ids(_take(it, 40))
    assert held and train and not held & train
    assert held | train == set(range(80))


def test_npy_with_separator_held_out_split_is_per_document(tmp_path):
    """Several documents per .npy file (sep=ID): the split is by document (file#index), and
    training never sees a held-out document (evaluation on it would read as better than it
    is), nor loses one that is not held out."""
    rng = np.random.default_rng(4)
    d = tmp_path / "npy"
    d.mkdir()
    doc = 1
    for f in range(4):  # doc i holds i*1000 + 1, 2, ... then the separator 0
        docs = []
        for _ in range(10):
            docs.append(np.append(doc * 1000 + 1 + np.arange(rng.integers(1, 12)), 0))
            doc += 1
        np.save(d / f"part{f}.npy", np.concatenate(docs).astype(np.int32))
    spec = f"npy:{d}/*.npy,sep=0,holdout=0.25"

    def ids(batches):
        out = set()
        for b in batches:
            out.update((b["inputs"][b["inputs"] > 0] // 1000).tolist())
        return out

    held = ids(data.make_eval_iter(spec, seq_len=32, batch_size=4))
    it = data.make_train_iter(spec, seq_len=32, batch_size=4, seed=0,
                              process_index=0, process_count=1)
    train = ids(_take(it, 30))  # several epochs
    assert held and train and not held & train, sorted(held & train)
    assert held | train == set(range(1, 41))


# -------------------------------------------------------------------- sharding


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path):
    d = _write_npy_docs(tmp_path, 40)
    spec = f"npy:{d}/*.npy,holdout=0"
    seen = []
    for p in range(3):
        it = data.make_train_iter(spec, seq_len=32, batch_size=4, seed=1,
                                  process_index=p, process_count=3)
        seen.append(_doc_ids(_take(it, 20)))  # several epochs of each shard
    assert all(seen)
    for p in range(3):
        for q in range(p + 1, 3):
            assert not seen[p] & seen[q]
    assert set().union(*seen) == set(range(40))
    with pytest.raises(ValueError, match="processes"):
        data.make_train_iter(spec, seq_len=32, batch_size=4, seed=1,
                             process_index=0, process_count=41)


def test_seed_changes_the_order(tmp_path):
    d = _write_npy_docs(tmp_path, 40)
    spec = f"npy:{d}/*.npy,holdout=0"
    mk = lambda s: data.make_train_iter(spec, seq_len=32, batch_size=4, seed=s,
                                        process_index=0, process_count=1)
    _assert_batches_equal(_take(mk(5), 3), _take(mk(5), 3))
    with pytest.raises(AssertionError):
        _assert_batches_equal(_take(mk(5), 3), _take(mk(6), 3))


def test_each_epoch_visits_every_file_once_in_a_new_order():
    files = [f"f{i}" for i in range(7)]
    order = pipeline.EpochOrder(files, seed=2)
    epochs = [[order(e * 7 + p) for p in range(7)] for e in range(4)]
    assert all(sorted(e) == files for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert [order(i) for i in range(28)] == sum(epochs, [])  # stateless: same index, same file


def test_a_files_pieces_come_in_a_new_order_each_epoch(tmp_path):
    """The per-file loader orders a file's pieces by (seed, index): the same index (a restore
    re-reading the file) gives the same order, a later epoch's index (i + number of files)
    the same pieces in another order, so a many-document file is not replayed in one fixed
    sequence every epoch."""
    np.save(tmp_path / "many.npy", np.concatenate(
        [np.append(i * 1000 + 1 + np.arange(3), 0) for i in range(1, 21)]).astype(np.int32))
    spec = f"npy:{tmp_path}/many.npy,sep=0,holdout=0"
    many = corpus.Corpus(data.parse_spec(spec), None, spec)
    load = many.loader(held_out=False, seq_len=8, seed=3)
    path = many.train_files[0]
    n_files = 3  # as if the file were one of three: it comes back at index i + 3

    def order(index):
        return [int(p["inputs"][0]) // 1000 for p in load(index, path)]

    first = order(1)
    assert sorted(first) == list(range(1, 21))
    assert order(1) == first
    later = [order(1 + e * n_files) for e in range(1, 4)]
    assert all(sorted(o) == sorted(first) for o in later)
    assert all(o != first for o in later), (first, later)


# ---------------------------------------------------------------- checkpointing


def test_get_state_set_state_resumes_exactly():
    mk = lambda: data.make_train_iter("stdlib", seq_len=64, batch_size=4, seed=7,
                                      vocab_size=256, process_index=0, process_count=1)
    it = mk()
    _take(it, 37)  # deep enough that files finish and bins wrap
    state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON
    want = _take(it, 25)
    fresh = mk()
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 25), want)


def test_orbax_round_trip_resumes_exactly(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    d = _write_npy_docs(tmp_path, 25, max_len=70)
    spec = f"npy:{d}/*.npy,holdout=0"
    mk = lambda: data.make_train_iter(spec, seq_len=16, batch_size=3, seed=11,
                                      process_index=0, process_count=1)
    it = mk()
    _take(it, 41)  # past the first flush of the packer's 64 bins
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(41, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    want = _take(it, 20)  # the uninterrupted run

    restored = mk()
    _take(restored, 2)  # a different position, to be overwritten by the restore
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 41
        mngr.restore(41, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(restored)))
    _assert_batches_equal(_take(restored, 20), want)


# -------------------------------------------------------------------- tokenizer

TEXTS = [
    "def héllo(wörld):\n    return wörld  # 日本語\n",
    "Hello world, hello tokens.\n\nNaïve café — ünïcödé — 🎉 done.",
    "print('ok')  \t trailing   ",
    "x = 1\ny = x + 1\n",
]


def _make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.save(str(path))
    return tok


def _docs_from_eval(batches):
    """The documents in an eval stream whose documents each fit in one segment."""
    docs, nbytes = [], 0
    for b in batches:
        nbytes += int(b["num_bytes"].sum())
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert b["loss_mask"][r, idx[-1]] == 0  # the segment is a whole document
                docs.append(b["inputs"][r, idx].tolist())
    return docs, nbytes


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_tokenizer_data_round_trips_and_counts_bytes(tmp_path, fmt):
    tok = _make_tokenizer(tmp_path / "tokenizer.json")
    d = tmp_path / "corpus"
    d.mkdir()
    if fmt == "text":
        for i, t in enumerate(TEXTS):
            (d / f"{i}.txt").write_text(t, encoding="utf-8")
        spec = f"text:{d}/*.txt,tokenizer={tmp_path}/tokenizer.json,eval={d}/*.txt"
    else:
        with open(d / "a.jsonl", "w", encoding="utf-8") as f:
            for t in TEXTS:
                f.write(json.dumps({"body": t, "id": 1}) + "\n\n")
        spec = f"jsonl:{d}/*.jsonl,tokenizer={tmp_path}/tokenizer.json,field=body,eval={d}/*.jsonl"
    vocab = tok.get_vocab_size()
    docs, nbytes = _docs_from_eval(data.make_eval_iter(spec, seq_len=64, batch_size=2,
                                                       vocab_size=vocab))
    assert sorted(tok.decode(ids) for ids in docs) == sorted(TEXTS)
    # Counted targets are every token but the first of each document: their bytes
    # are the document's UTF-8 bytes less those of the first token.
    want = 0
    for t in TEXTS:
        enc = tok.encode(t, add_special_tokens=False)
        first_chars = enc.offsets[0][1]
        want += len(t.encode("utf-8")) - len(t[:first_chars].encode("utf-8"))
    assert nbytes == want
    with pytest.raises(ValueError, match="vocab_size"):
        data.make_eval_iter(spec, seq_len=64, batch_size=2, vocab_size=vocab - 1)


def test_token_bytes_sum_to_the_utf8_length():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "ü": 1, "日本": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = "  a ü\t日本 zz  "
    enc = tok.encode(text)
    got = corpus.token_bytes(text, enc.offsets)
    assert got.sum() == len(text.encode("utf-8"))
    # whitespace dropped by the pre-tokenizer goes to the next token, trailing to the last
    assert got.tolist() == [3, 3, 7, 5]  # "  a", " ü", "\t日本", " zz  "


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    it = data.make_train_iter(f"jsonl:{tmp_path}/*.jsonl,tokenizer=bytes,holdout=0",
                              seq_len=8, batch_size=1, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"a.jsonl:2: no 'text' field"):
        next(it)


# -------------------------------------------------------------------------- npy


def test_npy_with_separator_and_vocab_check(tmp_path):
    np.save(tmp_path / "flat.npy", np.array([5, 6, 7, 0, 8, 9, 0, 0, 3, 4], np.int64))
    spec = f"npy:{tmp_path}/flat.npy,sep=0,eval={tmp_path}/flat.npy"
    docs, _ = _docs_from_eval(data.make_eval_iter(spec, seq_len=8, batch_size=2))
    # the separator stays at the end of the document it closes; a lone one is dropped
    assert sorted(docs) == [[3, 4], [5, 6, 7, 0], [8, 9, 0]]
    with pytest.raises(ValueError, match="token id 9 does not fit"):
        next(iter(data.make_eval_iter(spec, seq_len=8, batch_size=2, vocab_size=9)))


def test_jsonl_with_a_lone_surrogate_does_not_crash(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "abc \\ud800 def ghi jkl mno"}\n' * 40)
    it = data.make_train_iter(f"jsonl:{p},tokenizer=bytes,holdout=0", seq_len=16, batch_size=2,
                              seed=0, vocab_size=256, process_index=0, process_count=1)
    b = next(it)
    assert b["inputs"].max() < 256 and b["loss_mask"].sum() > 0


# ------------------------------------------------------------- review (2026-12-07)


def test_empty_files_beside_documents_never_end_a_run(tmp_path):
    """Empty files are skipped however the epochs' shuffles line them up: a run of them may
    span the end of one epoch and the start of the next (up to 2 x files - 2 in a row)."""
    (tmp_path / "a.txt").write_text("some text that is long enough " * 3)
    for i in range(3):
        (tmp_path / f"empty{i}.txt").write_text("")
    for seed in range(6):
        it = data.make_train_iter(f"text:{tmp_path}/*.txt,tokenizer=bytes,holdout=0", seq_len=16,
                                  batch_size=2, seed=seed, process_index=0, process_count=1)
        for _ in range(300):
            assert next(it)["loss_mask"].sum() > 0
    for p in tmp_path.glob("a.txt"):
        p.write_text("")
    it = data.make_train_iter(f"text:{tmp_path}/*.txt,tokenizer=bytes,holdout=0", seq_len=16,
                              batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no documents with 2 or more tokens"):
        next(it)


def _word_tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_tokenizer_ids_past_the_vocab_are_refused_even_with_few_tokens(tmp_path):
    tok = _word_tokenizer(tmp_path / "tokenizer.json", {"[UNK]": 0, "a": 1, "b": 2, "c": 500})
    (tmp_path / "d.txt").write_text("a b c a b c")
    with pytest.raises(ValueError, match="token ids up to 500"):
        data.make_eval_iter(f"text:{tmp_path}/d.txt,tokenizer={tok},eval={tmp_path}/d.txt",
                            seq_len=4, batch_size=1, vocab_size=64)
    # a model folder names its tokenizer.json
    docs, _ = _docs_from_eval(data.make_eval_iter(
        f"text:{tmp_path}/d.txt,tokenizer={tmp_path},eval={tmp_path}/d.txt", seq_len=8,
        batch_size=1, vocab_size=501))
    assert docs == [[1, 2, 500, 1, 2, 500]]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        data.parse_spec(f"text:{tmp_path}/d.txt,tokenizer={tmp_path / 'empty_dir'}")


def test_bad_files_are_refused_in_one_line_naming_them(tmp_path):
    np.savez(tmp_path / "z.npz", a=np.arange(5))
    it = data.make_eval_iter(f"npy:{tmp_path}/z.npz,eval={tmp_path}/z.npz", seq_len=4, batch_size=1)
    with pytest.raises(ValueError, match=r"z.npz: expected a 1-D integer array .* .npz archive"):
        next(iter(it))
    (tmp_path / "l.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    it = data.make_eval_iter(f"jsonl:{tmp_path}/l.jsonl,tokenizer=bytes,eval={tmp_path}/l.jsonl",
                             seq_len=4, batch_size=1)
    with pytest.raises(ValueError, match=r"l.jsonl:2: not UTF-8 text"):
        next(iter(it))
    with pytest.raises(ValueError, match="held-out split is empty"):
        data.make_eval_iter(f"jsonl:{tmp_path}/l.jsonl,tokenizer=bytes,holdout=0", seq_len=4,
                            batch_size=1)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    name = os.fsdecode(b"caf\xe9.txt")
    try:
        (tmp_path / name).write_text("hello world, hello again " * 4)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses non-UTF-8 names")
    for i in range(9):
        (tmp_path / f"ok{i}.txt").write_text("plain text, long enough to train on " * 2)
    it = data.make_train_iter(f"text:{tmp_path}/*.txt,tokenizer=bytes,holdout=0.3", seq_len=8,
                              batch_size=1, seed=0, process_index=0, process_count=1)
    assert next(it)["loss_mask"].sum() > 0


# ------------------------------------------------------ review (mutation round 4)


def test_sizes_and_process_index_out_of_range_are_refused():
    """The public iterators check their own arguments (not only the CLI): a zero length or
    batch count, or a process index outside [0, count)."""
    for kw in (dict(seq_len=0, batch_size=2), dict(seq_len=8, batch_size=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            data.make_eval_iter("stdlib", **kw)
    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        data.make_eval_iter("stdlib", seq_len=8, batch_size=2, max_batches=0)
    with pytest.raises(ValueError, match=r"process_index -1 not in \[0, 2\)"):
        data.make_train_iter("stdlib", seq_len=8, batch_size=2, seed=0,
                             process_index=-1, process_count=2)


def test_global_shard_rows_are_the_one_process_batch_split_by_process(tmp_path):
    """shard=global: every process builds the whole global batch and keeps its own rows, so
    the rows of processes 0 and 1 (in order) are exactly the batch one process would train
    on with the global batch size."""
    d = _write_npy_docs(tmp_path, 12)
    spec = f"npy:{d}/*.npy,holdout=0,shard=global"
    mk = lambda p, n, b: data.make_train_iter(spec, seq_len=16, batch_size=b, seed=3,
                                              process_index=p, process_count=n)
    whole = mk(0, 1, 4)  # one process, the global batch of 4 rows
    parts = [mk(p, 2, 2) for p in range(2)]  # two processes of 2 rows each
    for _ in range(3):
        w = next(whole)
        got = [next(it) for it in parts]
        assert got[0]["inputs"].shape == (2, 16)
        with pytest.raises(AssertionError):  # the two processes hold different rows
            np.testing.assert_array_equal(got[0]["inputs"], got[1]["inputs"])
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), w[k], err_msg=k)


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    """`~` in the file GLOB, the eval GLOB and the tokenizer path is the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _word_tokenizer(tmp_path / "tok.json", {"[UNK]": 0, "a": 1, "b": 2})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "d.txt").write_text("a b a b")
    s = data.parse_spec("text:~/c/*.txt,tokenizer=~/tok.json,eval=~/c/d.txt")
    assert (s.pattern, s.tokenizer, s.eval_pattern) == (
        f"{tmp_path}/c/*.txt", f"{tmp_path}/tok.json", f"{tmp_path}/c/d.txt")
    docs, _ = _docs_from_eval(data.make_eval_iter(
        "text:~/c/*.txt,tokenizer=~/tok.json,eval=~/c/*.txt", seq_len=8, batch_size=1))
    assert docs == [[1, 2, 1, 2]]


def test_a_file_named_alone_splits_like_through_a_glob(tmp_path):
    """A document's held-out key is its path relative to the glob's directory (plus the line):
    naming the one file, or matching it with a wildcard, holds out the same documents."""
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"<{i:03d}> doc"}) + "\n")

    def held(pattern):
        spec = f"jsonl:{pattern},tokenizer=bytes,holdout=0.3"
        docs, _ = _docs_from_eval(data.make_eval_iter(spec, seq_len=16, batch_size=4))
        return sorted(int(bytes(d[1:4]).decode()) for d in docs)

    by_glob = held(f"{tmp_path}/*.jsonl")
    assert 5 < len(by_glob) < 40
    assert held(f"{tmp_path}/docs.jsonl") == by_glob


def test_directories_matching_the_glob_are_not_read_as_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text, long enough to train on")
    (tmp_path / "sub.txt").mkdir()  # a directory whose name matches the glob
    (tmp_path / "sub.txt" / "b.txt").write_text("not matched by a non-recursive glob")
    it = data.make_train_iter(f"text:{tmp_path}/*,tokenizer=bytes,holdout=0", seq_len=8,
                              batch_size=2, seed=0, process_index=0, process_count=1)
    rows = [bytes(r[s > 0].astype(np.uint8)) for b in _take(it, 8)
            for r, s in zip(b["inputs"], b["segment_ids"])]
    assert all(r in b"plain text, long enough to train on" for r in rows)


def test_eval_glob_files_are_never_trained_on(tmp_path):
    """eval=GLOB names the held-out files: they are taken out of the training files even
    where the main GLOB matches them too."""
    d = _write_npy_docs(tmp_path, 10)
    spec = f"npy:{d}/*.npy,eval={d}/doc00[0-2].npy"
    assert _doc_ids(data.make_eval_iter(spec, seq_len=32, batch_size=4)) == {0, 1, 2}
    it = data.make_train_iter(spec, seq_len=32, batch_size=4, seed=0,
                              process_index=0, process_count=1)
    assert _doc_ids(_take(it, 30)) == set(range(3, 10))


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_byte_level_user_data_counts_one_byte_per_target(tmp_path, fmt):
    """tokenizer=bytes: every counted target is one byte, so bits per byte can be reported."""
    texts = ["héllo, wörld: some text", "x = 1\ny = 2\n", "日本語のテキスト"]
    if fmt == "text":
        for i, t in enumerate(texts):
            (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
        spec = f"text:{tmp_path}/*.txt,tokenizer=bytes,eval={tmp_path}/*.txt"
    else:
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        spec = f"jsonl:{tmp_path}/d.jsonl,tokenizer=bytes,eval={tmp_path}/d.jsonl"
    batches = list(data.make_eval_iter(spec, seq_len=64, batch_size=2))
    counted = sum(int(b["loss_mask"].sum()) for b in batches)
    assert counted == sum(len(t.encode()) - 1 for t in texts)
    assert sum(int(b["num_bytes"].sum()) for b in batches) == counted


def test_bad_values_inside_files_are_refused_naming_them(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": "ok ok"}\n{"text": 5}\n')
    it = data.make_eval_iter(f"jsonl:{tmp_path}/n.jsonl,tokenizer=bytes,eval={tmp_path}/n.jsonl",
                             seq_len=4, batch_size=1)
    with pytest.raises(ValueError, match=r"n.jsonl:2: field 'text' is int, not a string"):
        next(iter(it))
    np.save(tmp_path / "neg.npy", np.array([3, 4, -1, 5], np.int32))
    it = data.make_eval_iter(f"npy:{tmp_path}/neg.npy,eval={tmp_path}/neg.npy", seq_len=4,
                             batch_size=1)
    with pytest.raises(ValueError, match="neg.npy: negative token id -1"):
        next(iter(it))


def test_one_file_shows_every_document_once_before_any_twice(tmp_path):
    """Files are mixed in up to 16 at a time, but never more than the shard has: a one-file
    corpus is read one epoch after the other (not 16 shuffled epochs of it at once, which
    repeats documents long before the others are seen)."""
    n = 64  # documents of exactly seq_len tokens: one row each, every row full
    arr = np.concatenate([[i * 10 + 1, i * 10 + 2, i * 10 + 3, 0] for i in range(1, n + 1)])
    np.save(tmp_path / "one.npy", arr.astype(np.int32))
    it = data.make_train_iter(f"npy:{tmp_path}/one.npy,sep=0,holdout=0", seq_len=4,
                              batch_size=4, seed=0, process_index=0, process_count=1)
    docs = [int(r[0]) // 10 for b in _take(it, n // 4) for r in b["inputs"]]
    assert sorted(docs) == list(range(1, n + 1))


def test_a_finished_eval_iterator_restores_finished(tmp_path):
    """The eval stream is checkpointable too: the state of an iterator that has given every
    batch restores to one that gives no more (not an error claiming there are no documents)."""
    d = _write_npy_docs(tmp_path, 6)
    ds = data.make_eval_iter(f"npy:{d}/*.npy,eval={d}/*.npy", seq_len=16, batch_size=2)
    it = iter(ds)
    n = len(list(it))
    assert n >= 2
    again = iter(ds)
    again.set_state(json.loads(json.dumps(it.get_state())))
    assert list(again) == []
    half = iter(ds)
    _take(half, 1)
    rest = iter(ds)
    rest.set_state(half.get_state())
    _assert_batches_equal(list(rest), list(ds)[1:])


def test_text_file_split_errors_come_before_reading(tmp_path):
    """Text files are whole documents, split by file: an empty held-out side, or no training
    file left, is refused when the iterator is made, naming the cause."""
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"text of {name}, long enough")
    # the keys' hashes: none of a, b, c is held out at 0.02; b and c are at 0.9, a is not
    assert [corpus.is_held_out(k, 0.02) for k in ("a.txt", "b.txt", "c.txt")] == [False] * 3
    assert [corpus.is_held_out(k, 0.9) for k in ("a.txt", "b.txt", "c.txt")] == [False, True, True]
    with pytest.raises(ValueError, match="held-out split is empty"):
        data.make_eval_iter(f"text:{tmp_path}/*.txt,tokenizer=bytes", seq_len=8, batch_size=1)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ValueError, match="no training files are left"):
        data.make_train_iter(f"text:{tmp_path}/*.txt,tokenizer=bytes,holdout=0.9", seq_len=8,
                             batch_size=1, seed=0, process_index=0, process_count=1)


def test_utf8_byte_ends_at_every_encoding_length_boundary():
    text = "a\x7f\x80\u07ff\u0800\uffff\U00010000\U0010ffff"
    want = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
    np.testing.assert_array_equal(corpus.utf8_char_byte_ends(text), want)


def test_the_seed_sets_the_file_order_and_the_piece_mix():
    """Both seeded draws depend on the seed: each epoch's file order, and which open file
    gives the next piece."""
    files = [f"f{i}" for i in range(12)]
    orders = {s: [pipeline.EpochOrder(files, seed=s)(i) for i in range(12)] for s in range(3)}
    assert len({tuple(o) for o in orders.values()}) == 3
    t = lambda i, j: {"inputs": np.array([i * 10 + j, 0], np.int32)}
    per_file = [[t(i, j) for j in range(5)] for i in range(4)]

    def mixed(seed):
        ds = mixer.PieceMixDataset(grain.MapDataset.source(per_file), cycle=4, seed=seed,
                                   what="x", epoch=4)
        return [int(p["inputs"][0]) for p in ds]

    assert mixed(1) == mixed(1) and sorted(mixed(1)) == sorted(mixed(2))
    assert len({tuple(mixed(s)) for s in range(3)}) == 3
