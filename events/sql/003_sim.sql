-- The simulated world (docs/contracts.md §4): balances, executed operations and the world's own
-- bookkeeping, so a worker can crash at any moment and the world stays intact.
create schema if not exists sim;

-- The seeded world: one row, holding the world file's content (markets, rules, delays) so
-- every process that opens this database trades against the same world.
create table if not exists sim.world (
    id          int primary key default 1 check (id = 1),
    seeded_at   timestamptz not null default now(),
    source      text not null,
    config      jsonb not null
);

-- Contract table. `amount` is everything the account holds; `locked` is the part reserved by
-- resting orders (free = amount - locked). A futures wallet is the account `<account>:futures`.
create table if not exists sim.balances (
    account     text not null,
    currency    text not null,
    amount      numeric not null default 0,
    locked      numeric not null default 0,
    primary key (account, currency)
);

-- What the seed put into the world, per currency: `sim check` compares the live sum to it.
create table if not exists sim.seeded_totals (
    currency    text primary key,
    amount      numeric not null
);

-- Contract table: one row per operation the world executed. The columns after `created_at`
-- are the world's own (order, withdrawal and transfer details) and are not part of the
-- contract. `audit_ref` is the caller's intent id, recorded for tests only: the world never
-- reads it, because Upbit withdrawals and Binance spot<->futures transfers take no client id.
create table if not exists sim.operations (
    id                bigint generated always as identity primary key,
    exchange          text not null,
    account           text not null,
    kind              text not null
        check (kind in ('order', 'withdraw', 'deposit', 'transfer', 'master_transfer')),
    client_id         text,
    currency          text not null,
    amount            numeric not null,
    fee               numeric not null default 0,
    txid              text,
    status            text not null,
    created_at        timestamptz not null default now(),
    audit_ref         text,
    updated_at        timestamptz not null default now(),
    raw_status        text not null,
    fee_currency      text,
    -- orders: `amount` is the base filled so far, `cost` the quote paid/received so far
    symbol            text,
    side              text,
    order_type        text,
    price             numeric,
    requested_amount  numeric,
    quote_amount      numeric,
    cost              numeric not null default 0,
    next_fill_at      timestamptz,     -- a resting limit order's next half fill
    last_fill_at      timestamptz,     -- ... and when it is fully filled
    -- withdrawals: `amount` as requested, `received` what the destination is credited
    address           text,
    network           text,
    tag               text,
    received          numeric,
    internal          boolean,
    to_account        text,
    complete_at       timestamptz,     -- pending -> ok
    -- transfers (spot <-> futures, master <-> sub)
    from_account      text,
    from_wallet       text,
    to_wallet         text,
    -- deposits: the withdrawal it came from
    ref               bigint references sim.operations (id)
);

-- The real exchanges de-duplicate these by client id (order id / identifier, Binance
-- withdrawOrderId, Binance clientTranId); Upbit withdrawals and spot<->futures transfers
-- carry client_id NULL and are never de-duplicated.
create unique index if not exists operations_client_id
    on sim.operations (exchange, kind, client_id)
    where client_id is not null and kind in ('order', 'withdraw', 'master_transfer');
create index if not exists operations_history
    on sim.operations (account, kind, currency, created_at);
create index if not exists operations_open_orders
    on sim.operations (next_fill_at) where kind = 'order' and status = 'open';
create index if not exists operations_pending_withdrawals
    on sim.operations (complete_at) where kind = 'withdraw' and status = 'pending';

-- Money on its way: one row per withdrawal, credited to `account` once `arrive_at` passed.
-- Visible to the destination (pending, with txid) from `sent_at`.
create table if not exists sim.deposits (
    id            bigint generated always as identity primary key,
    withdrawal_id bigint not null unique references sim.operations (id),
    exchange      text not null,
    account       text not null,
    currency      text not null,
    amount        numeric not null,
    address       text not null,
    network       text not null,
    tag           text,
    txid          text,
    internal      boolean not null,
    sent_at       timestamptz not null,
    arrive_at     timestamptz not null,
    status        text not null default 'pending',
    credited_at   timestamptz,
    operation_id  bigint references sim.operations (id)
);
create index if not exists deposits_due on sim.deposits (arrive_at) where status = 'pending';
create index if not exists deposits_by_account on sim.deposits (account, currency, sent_at);

-- The persistent counter behind deterministic fault draws (seed + counter -> draw).
create table if not exists sim.fault_counter (
    id     int primary key default 1 check (id = 1),
    value  bigint not null default 0
);
insert into sim.fault_counter (id, value) values (1, 0) on conflict do nothing;
