-- One driver per workflow: a worker holds a short lease while it takes a step. Expired leases
-- (a worker that died mid-step) are taken over; the expected stream version is the last guard.
create table if not exists workflow_leases (
    workflow_id  uuid primary key,
    owner        text not null,
    expires_at   timestamptz not null
);
