from internvl35 import load
from internvl35.eval.runner import SUITES, run_suite


def test_suite_runs_and_reports_every_task(tiny_ckpt):
    m = load(tiny_ckpt)
    report = run_suite(m, "mini", n=1, max_new_tokens=4, progress=False)
    assert set(report["accuracy"]) == {t.name for t in SUITES["mini"]}
    assert 0.0 <= report["overall"] <= 1.0
    assert all(len(v) == 1 for v in report["examples"].values())
