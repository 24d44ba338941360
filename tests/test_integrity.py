"""Unit tests of two IO helpers the end-to-end training tests only exercise in bulk.

`checkpoint.integrity.probe`: a checkpoint's metadata missing or undecodable is named, and
every stored value is read, the last key's included (on a real Orbax checkpoint).
`train.metrics.MetricsLog`: non-finite floats are written as null (strict JSON), and a resume
keeps exactly the steps up to its checkpoint."""

import json
import os

import pytest

from dsv2_jax.checkpoint.integrity import probe


def test_probe_reports_missing_and_undecodable_metadata(tmp_path):
    assert probe(str(tmp_path)).endswith("_METADATA: missing")
    (tmp_path / "_METADATA").write_text("{not json")
    assert probe(str(tmp_path)) is not None
    (tmp_path / "_METADATA").write_text("{}")
    assert probe(str(tmp_path)) is None  # no manifest.ocdbt: one file per chunk, nothing to read


def test_metrics_log_writes_strict_json_and_a_resume_keeps_its_steps(tmp_path):
    from dsv2_jax.train.metrics import MetricsLog, read_records

    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, None)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float("nan") if step == 2 else 1.0 / step,
                   "grad_norm": float("inf") if step == 3 else 0.5})
    log.close()

    def strict(line):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    recs = [strict(line) for line in open(path)]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["loss"] is None and recs[2]["grad_norm"] is None and recs[0]["loss"] == 1.0
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # a line cut short by a crash
    assert [r["step"] for _, r in read_records(path)] == [1, 2, 3]

    MetricsLog(path, 2).close()  # resumed from the step-2 checkpoint: step 3 is recomputed
    assert [strict(line)["step"] for line in open(path)] == [1, 2]
    MetricsLog(path, None).close()  # no checkpoint: everything is recomputed
    assert open(path).read() == ""


def _indirect_values(path):
    """{key: (data file, offset, length)} of the values an OCDBT checkpoint at `path` keeps
    outside its b-tree, read from the checkpoint's own b-tree nodes (tensorstore's dump)."""
    import tensorstore as ts

    base = ts.KvStore.open({"driver": "file", "path": path + "/"}).result()
    todo = [v["root"]["location"] for v in ts.ocdbt.dump(base).result()["versions"]]
    found = {}
    while todo:
        node = ts.ocdbt.dump(base, todo.pop()).result()
        for e in node["entries"]:
            if "node" in e:  # an interior node: its children hold the keys
                todo.append(e["node"]["location"])
            elif "indirect_value" in e:
                _, prefix, name, offset, length = e["indirect_value"].split(":")
                found[e["key"]] = (os.path.join(path, prefix + name), int(offset), int(length))
    return found


def test_probe_reads_every_stored_value_the_last_key_included(tmp_path):
    """A real Orbax checkpoint whose only value stored outside the b-tree belongs to its last
    key: losing that value, or its last byte, is reported. A probe stopping one key short
    would call both checkpoints whole (checked against that mutant)."""
    import numpy as np
    import orbax.checkpoint as ocp
    import tensorstore as ts

    rng = np.random.default_rng()
    tree = {"a_small": np.arange(5, dtype=np.float32),   # small values sit in the b-tree itself
            "zz_large": rng.standard_normal(4099).astype(np.float32)}  # random: stays large
    path = str(tmp_path / "state")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    ckptr.close()
    assert probe(path) is None

    values = _indirect_values(path)
    last = max(values)
    assert list(values) == [last] and last.startswith(b"zz_large/"), values
    kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": path + "/"}}).result()
    assert last == max(kv.list().result())  # the last key the probe lists
    data, offset, length = values[last]
    whole = open(data, "rb").read()

    with open(data, "wb") as f:
        f.write(whole[:offset + length - 1])  # cut short by the value's last byte
    assert probe(path) is not None
    os.remove(data)  # missing: reads as an empty value, named by its key
    assert probe(path) == f"{path}: the data of {last.decode()} is missing"
    with open(data, "wb") as f:
        f.write(whole)
    assert probe(path) is None


def test_a_resume_keeps_a_last_record_cut_before_its_newline_and_only_integer_steps_count(tmp_path):
    """A complete last record whose newline was never written is kept on resume with the
    newline restored, so the next step's record starts a line of its own; lines whose `step`
    is not an integer (true, 2.5, a string) or that are not objects are not step records."""
    from dsv2_jax.train.metrics import MetricsLog, read_records

    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": true}\n[1, 2]\n"step"\n{"step": 2.5}\n{"step": "3"}\n'
                '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')
    assert [r["step"] for _, r in read_records(path)] == [1, 2]
    log = MetricsLog(path, 2)
    log.write({"step": 3, "loss": 0.25})
    log.close()
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]
