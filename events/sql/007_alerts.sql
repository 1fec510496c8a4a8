-- Alerts: one row per occurrence (the key), so each fires once. The read model is rebuilt
-- from the events like any other; what was already published is kept apart, in
-- alert_deliveries, so a rebuild never sends an alert twice.
create table if not exists alerts (
    key           text primary key,          -- what makes an occurrence the same occurrence
    kind          text not null,             -- workflow_failed | task_stuck | needs_attention | relay_lag
    workflow_id   uuid,
    task          text,
    message       text not null,
    since         timestamptz not null       -- when the condition began
);
create index if not exists alerts_since on alerts (since);

-- Occurrences that no event describes (relay_lag): not part of the rebuildable read model.
create table if not exists service_alerts (like alerts including all);

create table if not exists alert_deliveries (
    key           text primary key,
    published_at  timestamptz not null default now()
);
