-- The event store (docs/contracts.md §1): the only source of truth, append-only.
create table if not exists events (
    position        bigint generated always as identity primary key,
    transaction_id  xid8 not null default pg_current_xact_id(),
    stream_id       text not null,
    version         int  not null check (version >= 1),
    type            text not null,
    schema_version  int  not null default 1,
    data            jsonb not null,
    metadata        jsonb not null,
    recorded_at     timestamptz not null default now(),
    hash            bytea not null,
    unique (stream_id, version)
);

-- Global-order readers page through (transaction_id, position) below the snapshot barrier.
create index if not exists events_global_order on events (transaction_id, position);

-- The canonical form that the hash chain covers: PostgreSQL's own jsonb rendering (keys
-- sorted, fixed spacing) of the event's identity and payload, so the append function and
-- every auditor hash exactly the bytes the database holds. Declared STABLE, as
-- jsonb_build_object is: an IMMUTABLE label would stop PostgreSQL from inlining it, and a
-- non-inlined SQL function call cost more than the rest of an append together.
create or replace function event_canonical(
    p_stream_id text, p_version int, p_type text, p_schema_version int,
    p_data jsonb, p_metadata jsonb
) returns bytea
language sql stable parallel safe as $$
    select convert_to(jsonb_build_object(
        'stream_id', p_stream_id, 'version', p_version, 'type', p_type,
        'schema_version', p_schema_version, 'data', p_data, 'metadata', p_metadata)::text, 'UTF8')
$$;

-- Atomic multi-event append with an expected version, in one round trip. `p_events` is a
-- JSON array of {type, schema_version, data, metadata}: one parameter is much cheaper for the
-- client to send than four parallel arrays. A version clash raises SQLSTATE RB409 (checked
-- here) or 23505 (a concurrent appender committed the same version first); either way the
-- whole call appends nothing.
create or replace function append_events(
    p_stream_id text, p_expected_version int, p_events jsonb
) returns table (out_position bigint, out_transaction_id xid8, out_version int)
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
        returning e.position, e.transaction_id, e.version
             into out_position, out_transaction_id, out_version;
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
    returning e.position, e.transaction_id, e.version;
end
$$;
