-- Where a workflow's money went (projections/money.py), kept in the `workflows` read model so
-- `status`, the `rebalancer.query.workflow` reply and `exposure` read it without folding:
--   result      the spec's `result`, filled in from the tasks that are done (null until then)
--   fills       per trade task: filled, cost, average price, fees
--   rate        the effective rate from_currency -> to_currency (null until both are known)
--   fees        every fee, totalled per currency
--   remainders  what tasks left behind, per account
alter table workflows add column if not exists result jsonb;
alter table workflows add column if not exists fills jsonb;
alter table workflows add column if not exists rate jsonb;
alter table workflows add column if not exists fees jsonb;
alter table workflows add column if not exists remainders jsonb;

-- Rows written before these columns have them null: the projection starts again from the first
-- event (the read model is disposable) and fills every row, as `rebalancer replay` would.
delete from workflows;
delete from projection_checkpoints where name = 'workflows';
