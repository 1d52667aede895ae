"""The onnx package's backend test suite (node and real-model cases) through Kiln.

Every case either passes or is reported unsupported with a reason (an op or a feature
Kiln does not claim); none may fail. The count of passing cases only goes up: raise
MIN_PASSED as ops are added. Run the report by hand: python -m frontends.conformance
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from frontends import conformance

MIN_PASSED = 1152


@pytest.mark.slow
def test_conformance_suite_has_no_failures():
    cases = conformance._cases()
    names = sorted(cases)
    ops = {n: conformance._op_of(cases[n], conformance._op_names()) for n in names}
    results = conformance._Pool(os.cpu_count() or 1).run(names, ops, lambda outcome: None)
    report = conformance.report(results)
    print(report)
    failed = [f"{r.name} [{r.op}]: {r.reason}" for r in results if r.status == "failed"]
    assert not failed, "\n".join(failed)
    assert sum(r.status == "passed" for r in results) >= MIN_PASSED, report
    unsupported = [r for r in results if r.status == "unsupported"]
    assert all(r.reason for r in unsupported)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index(conformance.README_BEGIN) : readme.index(conformance.README_END)]
    assert table + conformance.README_END == conformance.op_table(results), (
        "the README's ONNX op table is stale: python -m frontends.conformance --readme README.md"
    )
