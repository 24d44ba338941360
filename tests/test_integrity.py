"""Unit tests of two IO helpers the end-to-end training tests only exercise in bulk.

`checkpoint.integrity.probe`: a checkpoint's metadata missing or undecodable is named.
`train.metrics.MetricsLog`: non-finite floats are written as null (strict JSON), and a resume
keeps exactly the steps up to its checkpoint."""

import json

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
