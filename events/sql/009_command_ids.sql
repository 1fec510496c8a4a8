-- A command id is bound to its first command: its kind (the subject) and a hash of its body.
-- The row is inserted before the command runs (on conflict do nothing), so of concurrent
-- duplicates exactly one runs; a reuse with another kind or body is refused as a conflict.
create table if not exists command_ids (
    command_id  text primary key,
    kind        text not null,
    body_hash   text not null,
    workflow_id text,
    recorded_at timestamptz not null default now()
);
