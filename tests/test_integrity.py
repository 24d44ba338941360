"""Unit tests of two IO helpers the end-to-end training tests only exercise in bulk.

`checkpoint.integrity.probe` on a stubbed OCDBT store: every stored value is checked, the
last one included (the damage tests in test_train_resume.py damage many values at once, so
a probe that skipped one would still pass them). `train.metrics.MetricsLog`: non-finite
floats are written as null (strict JSON), and a resume keeps exactly the steps up to its
checkpoint."""

import json
import sys
import types

import pytest

from dsv2_jax.checkpoint.integrity import probe


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class _Store:
    def __init__(self, values):
        self.values = values

    def list(self):
        return _Done(list(self.values))

    def read(self, key, byte_range=None):
        v = self.values[key]
        return _Done(types.SimpleNamespace(value=v[byte_range] if v else b""))


def _checkpoint(tmp_path, monkeypatch, values):
    (tmp_path / "_METADATA").write_text("{}")
    (tmp_path / "manifest.ocdbt").write_bytes(b"")
    fake = types.ModuleType("tensorstore")
    fake.KvStore = types.SimpleNamespace(open=lambda spec: _Done(_Store(values)))
    monkeypatch.setitem(sys.modules, "tensorstore", fake)
    return str(tmp_path)


@pytest.mark.parametrize("missing", [None, 0, 1, 2])
def test_probe_reads_every_value(tmp_path, monkeypatch, missing):
    keys = [b"a/.zarray", b"a/0.0", b"b/0"]
    values = {k: (b"" if i == missing else b"xyz") for i, k in enumerate(keys)}
    got = probe(_checkpoint(tmp_path, monkeypatch, values))
    if missing is None:
        assert got is None
    else:
        assert got is not None and keys[missing].decode() in got


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
