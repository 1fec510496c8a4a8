-- Alert webhooks (rebalancer/webhooks.py): a durable outbox, one row per (alert occurrence,
-- sink), so a restart neither loses an alert nor sends a delivered one again. Like
-- alert_deliveries it is kept apart from the `alerts` read model: a rebuild keeps the same
-- keys, finds their rows here and sends nothing twice.

-- When each sink began taking each kind: it gets the alerts of that kind whose condition began
-- after that, not the history from before it was configured (nor a flood of old ones when a
-- kind is added to it later).
create table if not exists webhook_sinks (
    name           text not null,
    kind           text not null,
    registered_at  timestamptz not null default now(),
    primary key (name, kind)
);

create table if not exists webhook_deliveries (
    alert_key        text not null,
    sink             text not null,
    attempts         int not null default 0,
    -- Due again at: after a failure, its backoff; while an attempt is in flight, the end of
    -- that attempt's lease (a process that dies mid-POST leaves it to the next one).
    next_attempt_at  timestamptz not null default now(),
    last_error       text,            -- what the last failure was, never the URL
    delivered_at     timestamptz,
    gave_up_at       timestamptz,     -- max_attempts failed; kept for the operator
    created_at       timestamptz not null default now(),
    primary key (alert_key, sink)
);
create index if not exists webhook_deliveries_due on webhook_deliveries (sink, next_attempt_at)
    where delivered_at is null and gave_up_at is null;

-- The service enqueues, claims and records (011's default privileges give the same when the
-- owner runs this; said here too for a cluster where another role migrates).
grant select, insert, update, delete on webhook_sinks, webhook_deliveries to rebalancer_service;
