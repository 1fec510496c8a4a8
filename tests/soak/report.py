"""The soak's report: what counts as a failure, and the text a person reads."""

from __future__ import annotations

from typing import Any


def problems(report: dict[str, Any]) -> list[str]:
    """Why the soak fails (empty: it passed). Workflows that need attention because the world
    could not tell whether an operation landed are legitimate, not problems."""
    found: list[str] = []
    ops, events = report["operations"], report["events"]
    if ops["duplicates"]:
        found.append(f"{len(ops['duplicates'])} operation(s) executed more than once")
    if ops["strays"]:
        found.append(f"{len(ops['strays'])} operation(s) no stored intent accounts for")
    if ops["client_ids_stored_twice"]:
        found.append(f"{len(ops['client_ids_stored_twice'])} client id(s) stored twice")
    if events["lost"]:
        found.append(f"{events['lost']} event(s) in the table missing from the JetStream copy")
    if not report["sim_check"]["ok"]:
        found.append("sim check failed")
    if not report["audit"]["ok"]:
        found.append("audit failed")
    if report["still_running"]:
        found.append(f"{len(report['still_running'])} workflow(s) never ended")
    if report["starts_refused"]:
        found.append(f"{len(report['starts_refused'])} start(s) refused")
    if report["serve_exited_on_its_own"]:
        found.append(f"serve exited on its own {len(report['serve_exited_on_its_own'])} time(s)")
    if report["serve_final_exit_status"] != 0:
        found.append(f"the last serve stopped with status {report['serve_final_exit_status']}")
    unexplained = [w for w in report["outcomes"]["not_done"] if not w["uncertain_outcome"]]
    if unexplained:
        found.append(f"{len(unexplained)} workflow(s) not done with no uncertain outcome to"
                     " explain it")
    return found


def text(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal (the JSON file has everything)."""
    k, out, ops, ev = (report["knobs"], report["outcomes"], report["operations"],
                       report["events"])
    audit = report["audit"]["output"]
    sim_rows = report["sim_check"]["output"].get("currencies", [])
    lines = [
        f"soak: {k['workflows']} workflows, {k['kills']} kills asked; seed {k['seed']},"
        f" faults {k['faults']}, time scale {k['time_scale']:g}",
        f"kills: {report['kills']} SIGKILLs of serve ({report['killed_holding_claims']} while"
        f" it held claims), {report['serve_incarnations']} incarnations, exited on its own:"
        f" {len(report['serve_exited_on_its_own'])}, last one stopped with status"
        f" {report['serve_final_exit_status']}",
        f"workflows started: {report['workflows_started']} over the command API"
        f" (requests repeated with the same command id: {report['start_repeats_no_reply']}"
        f" unanswered, {report['start_repeats_retryable']} retryable refusals;"
        f" {report['starts_answered_already_created']} answered 'already created')",
        "terminal states: " + ", ".join(f"{s} {n}" for s, n in out["states"].items())
        + (f"; never ended: {len(report['still_running'])}" if report["still_running"] else ""),
        f"kills each workflow lived through: min {report['kills_per_workflow']['min']},"
        f" median {report['kills_per_workflow']['median']},"
        f" max {report['kills_per_workflow']['max']}",
        f"intents: {out['intents']}, resets after a restart or fault: {out['resets']},"
        f" escalations: {out['escalations']}",
        f"duplicate operations: {len(ops['duplicates'])} (of {ops['operations']} executed;"
        f" without an intent: {len(ops['strays'])})",
        f"lost events: {ev['lost']} (table {ev['table']}, JetStream copy {ev['copy']};"
        f" copied twice: {ev['copied_twice']}, in the copy only: {ev['not_in_table']})",
        f"sim check: ok ({len(sim_rows)} currencies, every total unchanged)"
        if report["sim_check"]["ok"] else f"sim check: FAILED ({sim_rows})",
        f"audit: {'ok' if report['audit']['ok'] else 'FAILED'} ({audit.get('streams')} streams,"
        f" {audit.get('events')} events, {len(audit.get('findings') or [])} findings;"
        f" {audit.get('jetstream')})",
        f"wall time: {report['wall_seconds']:.0f} s (soak {report['soak_seconds']:.0f} s)",
    ]
    for w in out["not_done"]:
        tasks = "; ".join(f"{t['task']} ({t['kind']}) {t['state']}: {t['code']}: {t['message']}"
                          for t in w["tasks"]) or w["reason"]
        lines.append(f"  {w['state']} {w['workflow_id']}: {tasks}")
    for d in ops["duplicates"]:
        lines.append(f"  DUPLICATE {d}")
    for e in ev["lost_first"]:
        lines.append(f"  LOST {e}")
    found = problems(report)
    lines.append("result: " + ("ok" if not found else "FAILED: " + "; ".join(found)))
    return "\n".join(lines)
