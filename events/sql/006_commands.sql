-- Commands are idempotent by command_id. A command that appended events is found through
-- them (the append and the record are one transaction); one that was refused appended
-- nothing, so its reply is kept here.
create index if not exists events_command_id on events ((metadata ->> 'command_id'))
    where metadata ? 'command_id';

create table if not exists command_outcomes (
    command_id  text primary key,
    kind        text not null,
    reply       jsonb not null,
    recorded_at timestamptz not null default now()
);
