-- The worker's schedule (docs/contracts.md §1): one row per workflow that may need the worker,
-- written by append_events in the same transaction as the append, so finding work never waits
-- on a projection. Workers claim due rows with FOR UPDATE SKIP LOCKED and renew their claims
-- while they work; a claim that expired (a dead worker) is anyone's. A workflow the worker has
-- nothing more to do for (finished, paused, waiting on an operator) has no row: the next append
-- (a command) puts it back.
create table if not exists workflow_schedule (
    workflow_id       uuid primary key,
    version           int not null,          -- the stream's version at its last append
    next_run_at       timestamptz not null default now(),
    claimed_by        text,
    claim_expires_at  timestamptz,
    failures          int not null default 0,  -- unexpected errors in a row (the bulkhead)
    retries           int not null default 0,  -- retryable exchange errors in a row (backoff)
    last_error        text
);
create index if not exists workflow_schedule_due on workflow_schedule (next_run_at);

-- Streams that were active under the pass design: every workflow whose last event does not end
-- it. A finished one found here is dropped by the first worker that folds it.
insert into workflow_schedule (workflow_id, version)
select substr(stream_id, 10)::uuid, version
  from (select distinct on (stream_id) stream_id, version, type, data ->> 'dest' as dest
          from events
         where stream_id ~ '^workflow-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
         order by stream_id, version desc) last
 where not (type = 'WorkflowStateChanged' and dest in ('done', 'failed', 'canceled'))
on conflict (workflow_id) do nothing;

drop table if exists workflow_leases;

-- append_events as in 001, plus: the schedule row of a workflow stream is made due now in the
-- same transaction, and each appended row's recorded_at and hash are returned, so the appender
-- can apply what it stored without reading it back.
drop function if exists append_events(text, int, jsonb);
create function append_events(
    p_stream_id text, p_expected_version int, p_events jsonb
) returns table (out_position bigint, out_transaction_id xid8, out_version int,
                 out_recorded_at timestamptz, out_hash bytea)
language plpgsql as $$
declare
    v_current int;
    v_hash bytea;
    v_hashes bytea[] := '{}';
    v_event jsonb;
    n int := jsonb_array_length(p_events);
begin
    select e.version, e.hash into v_current, v_hash
      from events e where e.stream_id = p_stream_id
     order by e.version desc limit 1;
    v_current := coalesce(v_current, 0);
    if v_current <> p_expected_version then
        raise exception 'stream % is at version %, expected %',
            p_stream_id, v_current, p_expected_version using errcode = 'RB409';
    end if;
    if p_stream_id ~ '^workflow-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
        -- A claim in force stays its holder's: its next append fails on the version and it
        -- hands the workflow back due now.
        insert into workflow_schedule as s (workflow_id, version)
        values (substr(p_stream_id, 10)::uuid, v_current + n)
        on conflict (workflow_id) do update
           set version = excluded.version, next_run_at = least(s.next_run_at, now());
    end if;
    v_hash := coalesce(v_hash, ''::bytea);
    if n = 1 then
        -- The common case (one transition per step) skips the array machinery.
        v_event := p_events -> 0;
        insert into events as e (stream_id, version, type, schema_version, data, metadata, hash)
        values (p_stream_id, v_current + 1, v_event ->> 'type',
                (v_event ->> 'schema_version')::int, v_event -> 'data', v_event -> 'metadata',
                sha256(v_hash || event_canonical(
                    p_stream_id, v_current + 1, v_event ->> 'type',
                    (v_event ->> 'schema_version')::int, v_event -> 'data', v_event -> 'metadata')))
        returning e.position, e.transaction_id, e.version, e.recorded_at, e.hash
             into out_position, out_transaction_id, out_version, out_recorded_at, out_hash;
        return next;
        return;
    end if;
    for i in 1..n loop
        v_event := p_events -> (i - 1);
        v_hash := sha256(v_hash || event_canonical(
            p_stream_id, v_current + i, v_event ->> 'type', (v_event ->> 'schema_version')::int,
            v_event -> 'data', v_event -> 'metadata'));
        v_hashes := v_hashes || v_hash;
    end loop;
    return query
    insert into events as e (stream_id, version, type, schema_version, data, metadata, hash)
    select p_stream_id, v_current + x.i::int, x.ev ->> 'type', (x.ev ->> 'schema_version')::int,
           x.ev -> 'data', x.ev -> 'metadata', v_hashes[x.i]
      from jsonb_array_elements(p_events) with ordinality as x(ev, i)
     order by x.i
    returning e.position, e.transaction_id, e.version, e.recorded_at, e.hash;
end
$$;
