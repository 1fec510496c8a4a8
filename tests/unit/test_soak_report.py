"""The soak's verdict (tests/soak/report.py): what makes `make soak` exit non-zero, and what
it lets pass (a workflow that needs attention because the world could not tell)."""

from __future__ import annotations

import copy
from typing import Any

from tests.soak.report import problems, text

CLEAN: dict[str, Any] = {
    "knobs": {"workflows": 2, "kills": 3, "seed": 1, "faults": "timeout=0.1", "time_scale": 50},
    "kills": 3, "serve_incarnations": 4, "killed_holding_claims": 1,
    "serve_exited_on_its_own": [], "serve_final_exit_status": 0,
    "workflows_started": 2, "start_repeats_no_reply": 1, "start_repeats_retryable": 0,
    "starts_answered_already_created": 0, "starts_refused": [], "still_running": [],
    "kills_per_workflow": {"min": 0, "median": 1, "max": 2},
    "outcomes": {"states": {"done": 1, "needs_attention": 1}, "intents": 9, "resets": 1,
                 "escalations": 1, "stuck": [],
                 "not_done": [{"workflow_id": "w2", "state": "needs_attention", "reason": None,
                               "escalations": ["unknown_outcome"], "uncertain_outcome": True,
                               "tasks": [{"task": "withdraw_to_interim", "kind": "withdraw",
                                          "state": "needs_attention", "code": "unknown_outcome",
                                          "message": "two candidates"}]}]},
    "operations": {"operations": 8, "duplicates": [], "strays": [],
                   "client_ids_stored_twice": []},
    "events": {"table": 60, "copy": 60, "lost": 0, "lost_first": [], "not_in_table": 0,
               "copied_twice": 0},
    "sim_check": {"ok": True, "exit_status": 0, "output": {"ok": True, "currencies": []}},
    "audit": {"ok": True, "exit_status": 0,
              "output": {"streams": 2, "events": 60, "findings": [], "jetstream": "checked"}},
    "soak_seconds": 10.0, "wall_seconds": 12.0,
}


def changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    report = copy.deepcopy(CLEAN)
    where = report
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    return report


def test_an_uncertain_outcome_passes_and_is_named_with_its_reason() -> None:
    assert problems(CLEAN) == []
    shown = text(CLEAN)
    assert "needs_attention w2: withdraw_to_interim (withdraw)" in shown
    assert "two candidates" in shown and shown.endswith("result: ok")


def test_each_failure_makes_the_soak_fail() -> None:
    cases = {
        ("operations", "duplicates"): [{"workflow_id": "w1", "operations": [3, 4]}],
        ("events", "lost"): 2,
        ("sim_check", "ok"): False,
        ("audit", "ok"): False,
        ("still_running",): ["w1"],
        ("serve_exited_on_its_own",): [1],
    }
    for path, value in cases.items():
        found = problems(changed(path, value))
        assert len(found) == 1, (path, found)
        assert "FAILED" in text(changed(path, value)).splitlines()[-1]


def test_needs_attention_without_an_uncertain_outcome_fails() -> None:
    report = copy.deepcopy(CLEAN)
    report["outcomes"]["not_done"][0].update(uncertain_outcome=False, escalations=["internal"])
    assert problems(report) == ["1 workflow(s) not done with no uncertain outcome to explain it"]
