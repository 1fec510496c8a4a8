-- Least privilege (docs/security.md): `rebalancer_owner` owns the schema and runs migrations;
-- `rebalancer_service` (`serve` and the command line) may read and append `events` and nothing
-- more on it. No passwords here: `infra up` sets them on the embedded cluster, and on a
-- PostgreSQL of your own you give the roles LOGIN and a password yourself.
--
-- Roles are cluster-wide and may exist already (another database of the same cluster, the
-- tests' copies of a migrated template): everything below may run again and changes nothing.
do $$
begin
    if not exists (select from pg_roles where rolname = 'rebalancer_owner') then
        create role rebalancer_owner nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'rebalancer_service') then
        create role rebalancer_service nologin;
    end if;
exception when insufficient_privilege then
    raise exception 'the roles rebalancer_owner and rebalancer_service do not exist and % may '
                    'not create them', current_user
        using hint = 'create them as an administrator first (docs/security.md)';
end
$$;

-- The audited way around the guard below: who changed or removed which event, when and why.
-- The service may read it, never write it (it cannot change `events` either).
create table if not exists maintenance_log (
    id             bigint generated always as identity primary key,
    at             timestamptz not null default now(),
    by_role        text not null default current_user,
    session_role   text not null default session_user,
    reason         text not null,
    operation      text not null check (operation in ('UPDATE', 'DELETE', 'TRUNCATE')),
    event_position bigint,        -- null for TRUNCATE
    stream_id      text,
    old_event      jsonb,         -- the row as it was
    new_event      jsonb          -- UPDATE only
);

-- `events` is append-only for everyone. The one way to change it: a member of
-- rebalancer_owner (or a superuser) sets `rebalancer.maintenance` to a reason inside a
-- transaction (`set local`), and every changed row is logged in maintenance_log in the same
-- transaction. `session_replication_role = replica` (superusers only) skips this trigger, as
-- it skips every trigger: that is what a superuser can always do.
create or replace function events_guard() returns trigger
language plpgsql as $$
declare
    v_reason text := nullif(current_setting('rebalancer.maintenance', true), '');
begin
    if v_reason is null or not pg_has_role(current_user, 'rebalancer_owner', 'MEMBER') then
        raise exception 'events is append-only: % refused', tg_op
            using errcode = 'RB423',
                  hint = 'the maintenance path (docs/security.md) is the only exception';
    end if;
    if tg_level = 'STATEMENT' then
        insert into maintenance_log (reason, operation) values (v_reason, tg_op);
        return null;
    end if;
    insert into maintenance_log (reason, operation, event_position, stream_id, old_event,
                                 new_event)
    values (v_reason, tg_op, old.position, old.stream_id, to_jsonb(old),
            case when tg_op = 'UPDATE' then to_jsonb(new) end);
    return case when tg_op = 'DELETE' then old else new end;
end
$$;

drop trigger if exists events_guard_rows on events;
create trigger events_guard_rows before update or delete on events
    for each row execute function events_guard();
drop trigger if exists events_guard_truncate on events;
create trigger events_guard_truncate before truncate on events
    for each statement execute function events_guard();

-- The service's privileges: SELECT and INSERT on events; everything on the read models,
-- schedule, relay checkpoints, command ids and outcomes, alerts and the simulated world
-- (rebuilt by `replay`, reset by `sim seed --reset`); read-only on the bookkeeping.
revoke all on events, maintenance_log, schema_migrations from public;
revoke all on events, maintenance_log, schema_migrations from rebalancer_service;
grant select, insert on events to rebalancer_service;
grant select on maintenance_log, schema_migrations to rebalancer_service;
grant usage on schema sim to rebalancer_service;
-- `replay --verify` rebuilds into a schema of its own (rebalancer_verify), which it drops and
-- makes again: the service may create schemas, which it then owns; nothing of the owner's.
do $$
begin
    execute format('grant create on database %I to rebalancer_service', current_database());
end
$$;
do $$
declare r record;
begin
    execute format('grant usage on sequence %s to rebalancer_service',
                   pg_get_serial_sequence('events', 'position'));
    for r in select c.oid::regclass as name from pg_class c
               join pg_namespace n on n.oid = c.relnamespace
              where n.nspname in ('public', 'sim') and c.relkind in ('r', 'p', 'v')
                and (n.nspname, c.relname) not in
                    (('public', 'events'), ('public', 'maintenance_log'),
                     ('public', 'schema_migrations')) loop
        execute format('grant select, insert, update, delete, truncate on %s to rebalancer_service',
                       r.name);
    end loop;
    for r in select c.oid::regclass as name from pg_class c
               join pg_namespace n on n.oid = c.relnamespace
              where n.nspname = 'sim' and c.relkind = 'S' loop
        -- update: `sim seed --reset` starts the ids at 1 again (setval).
        execute format('grant usage, select, update on sequence %s to rebalancer_service',
                       r.name);
    end loop;
    -- Tables later migrations make as the owner are the service's to use as well; a
    -- migration that wants less revokes it.
    if pg_has_role(current_user, 'rebalancer_owner', 'MEMBER') then
        alter default privileges for role rebalancer_owner in schema public, sim
            grant select, insert, update, delete, truncate on tables to rebalancer_service;
        alter default privileges for role rebalancer_owner in schema public, sim
            grant usage, select, update on sequences to rebalancer_service;
    end if;
end
$$;

-- A transaction left open holds the snapshot barrier and so every follower back (the
-- relay_lag alert is the sign): the limit applies to every session of this database, not just
-- the service's. The service's statements get a limit too. Both need more than the schema's
-- ownership on some clusters; `infra up` sets them on the embedded one either way.
do $$
begin
    execute format('alter database %I set idle_in_transaction_session_timeout = %L',
                   current_database(), '60s');
exception when insufficient_privilege then
    raise warning 'idle_in_transaction_session_timeout not set on database %: % may not',
        current_database(), current_user;
end
$$;
do $$
begin
    alter role rebalancer_service set statement_timeout = '30s';
exception when insufficient_privilege then
    raise notice 'statement_timeout of rebalancer_service not set: % may not', current_user;
end
$$;
