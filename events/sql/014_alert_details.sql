-- What an operator needs to act on an alert, where its event recorded it: a needs_attention's
-- candidates ({id, txid, amount, at, claimed_by_workflow}) and the commands that settle it.
alter table alerts add column if not exists details jsonb;
alter table service_alerts add column if not exists details jsonb;
