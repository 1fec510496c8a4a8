-- Hash chain v2 (docs/contracts.md §1): the hash also covers `position` and `recorded_at`, so a
-- re-dated or re-numbered event breaks the chain like an edited one. Events stored before this
-- migration keep their v1 hashes; `hash_version` says which canonical form each row's hash is
-- over, so an audit verifies every event with its own version.
alter table events add column if not exists hash_version smallint not null default 1;

-- recorded_at is rendered in UTC with microseconds by to_char, not by jsonb: a timestamptz in
-- jsonb follows the session's TimeZone, and every auditor must hash the same bytes.
create or replace function event_canonical_v2(
    p_position bigint, p_stream_id text, p_version int, p_type text, p_schema_version int,
    p_data jsonb, p_metadata jsonb, p_recorded_at timestamptz
) returns bytea
language sql stable parallel safe as $$
    select convert_to(jsonb_build_object(
        'position', p_position, 'stream_id', p_stream_id, 'version', p_version, 'type', p_type,
        'schema_version', p_schema_version, 'data', p_data, 'metadata', p_metadata,
        'recorded_at', to_char(p_recorded_at at time zone 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text, 'UTF8')
$$;

-- append_events as in 008, with the v2 hash: the position is drawn from the identity sequence
-- and recorded_at is now() given explicitly, inside the one INSERT, so the hash covers exactly
-- the stored values and an append is still one statement (one round trip) per call. The
-- function runs with its caller's rights: a role that appends needs INSERT on events and USAGE
-- on events_position_seq (an explicit nextval, unlike the identity default, checks it).
create or replace function append_events(
    p_stream_id text, p_expected_version int, p_events jsonb
) returns table (out_position bigint, out_transaction_id xid8, out_version int,
                 out_recorded_at timestamptz, out_hash bytea)
language plpgsql as $$
declare
    v_current int;
    v_hash bytea;
    v_event jsonb;
    v_position bigint;
    v_positions bigint[] := '{}';
    v_hashes bytea[] := '{}';
    v_now timestamptz := now();
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
        -- The common case (one transition per step) skips the loop: one INSERT whose VALUES
        -- draw the position, so the hash is computed over it in the same statement.
        v_event := p_events -> 0;
        insert into events as e (position, stream_id, version, type, schema_version, data,
                                 metadata, recorded_at, hash, hash_version)
        overriding system value
        select p.pos, p_stream_id, v_current + 1, v_event ->> 'type',
               (v_event ->> 'schema_version')::int, v_event -> 'data', v_event -> 'metadata',
               v_now,
               sha256(v_hash || event_canonical_v2(
                   p.pos, p_stream_id, v_current + 1, v_event ->> 'type',
                   (v_event ->> 'schema_version')::int, v_event -> 'data', v_event -> 'metadata',
                   v_now)),
               2
          from (select nextval('events_position_seq'::regclass) as pos) p
        returning e.position, e.transaction_id, e.version, e.recorded_at, e.hash
             into out_position, out_transaction_id, out_version, out_recorded_at, out_hash;
        return next;
        return;
    end if;
    -- Several events: the positions are drawn first (ascending with the versions), each hash
    -- follows the previous one, then one INSERT stores them all.
    for i in 1..n loop
        v_event := p_events -> (i - 1);
        v_position := nextval('events_position_seq'::regclass);
        v_hash := sha256(v_hash || event_canonical_v2(
            v_position, p_stream_id, v_current + i, v_event ->> 'type',
            (v_event ->> 'schema_version')::int, v_event -> 'data', v_event -> 'metadata', v_now));
        v_positions := v_positions || v_position;
        v_hashes := v_hashes || v_hash;
    end loop;
    return query
    insert into events as e (position, stream_id, version, type, schema_version, data,
                             metadata, recorded_at, hash, hash_version)
    overriding system value
    select v_positions[x.i], p_stream_id, v_current + x.i::int, x.ev ->> 'type',
           (x.ev ->> 'schema_version')::int, x.ev -> 'data', x.ev -> 'metadata', v_now,
           v_hashes[x.i], 2
      from jsonb_array_elements(p_events) with ordinality as x(ev, i)
     order by x.i
    returning e.position, e.transaction_id, e.version, e.recorded_at, e.hash;
end
$$;

-- What `rebalancer replay --force` did over a failed audit (docs/contracts.md §1): the rebuild
-- is recorded with the audit's findings, so a replay never quietly papers over evidence.
create table if not exists replay_log (
    id           bigint generated always as identity primary key,
    action       text not null,
    findings     int not null,
    bad_streams  text[] not null,
    details      jsonb not null,
    recorded_at  timestamptz not null default now()
);

-- The service records a forced replay and may read the log, never rewrite it (docs/security.md).
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'rebalancer_service') then
        grant select, insert on replay_log to rebalancer_service;
        revoke update, delete, truncate on replay_log from rebalancer_service;
    end if;
end
$$;
