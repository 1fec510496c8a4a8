-- The relay's place in the global order (docs/contracts.md §1, §3). It is advanced only over events
-- that JetStream acknowledged, so after a crash the relay re-publishes at most the unacknowledged
-- tail, and JetStream's dedupe window (Nats-Msg-Id) drops the copies.
create table if not exists relay_checkpoints (
    name            text primary key,
    transaction_id  xid8 not null default '0',
    position        bigint not null default 0,
    published       bigint not null default 0,   -- events acknowledged by JetStream so far
    updated_at      timestamptz not null default now()
);
