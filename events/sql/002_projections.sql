-- Read models (disposable: `rebalancer replay` rebuilds them from the events) and their
-- checkpoints. A checkpoint is written in the same transaction as its read model's rows.
create table if not exists projection_checkpoints (
    name            text primary key,
    transaction_id  xid8 not null default '0',
    position        bigint not null default 0,
    events_applied  bigint not null default 0,
    error           text,            -- set when a poison event stopped this projection
    error_position  bigint,
    updated_at      timestamptz not null default now()
);

create table if not exists workflows (
    workflow_id        uuid primary key,
    stream_id          text not null unique,
    spec_name          text not null,
    spec               jsonb not null,
    params             jsonb not null,
    command_id         text not null,
    state              text not null,
    reason             text,
    current_task       int,
    current_task_name  text,
    tasks              jsonb not null,
    error              jsonb,
    from_amount        numeric,
    from_currency      text,
    to_amount          numeric,
    to_currency        text,
    created_at         timestamptz,
    updated_at         timestamptz,
    version            int not null,
    last_position      bigint not null
);

-- The worker's question "which workflows still need driving?" reads only this small index.
create index if not exists workflows_active on workflows (updated_at)
    where state in ('created', 'running', 'paused', 'needs_attention');
create index if not exists workflows_state on workflows (state, updated_at desc);

create table if not exists exposure_items (
    workflow_id   uuid not null,
    task_index    int not null,
    kind          text not null,
    from_account  text,
    to_account    text,
    currency      text,
    amount        numeric not null,
    status        text not null,
    since         timestamptz not null,
    last_version  int not null,
    primary key (workflow_id, task_index)
);

create or replace view exposure as
    select to_account as account, currency, sum(amount) as amount, count(*) as items,
           min(since) as oldest
      from exposure_items
     where kind <> 'deposit'
     group by to_account, currency;
