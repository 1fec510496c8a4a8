-- Command ids used before 009 bound nothing: a reuse with another kind or body would have been
-- answered from their events. Bind each to the kind its first event shows, with a body hash no
-- command can match, so any later reuse of such an id is refused as a conflict naming it.
insert into command_ids (command_id, kind, body_hash, workflow_id, recorded_at)
select distinct on (metadata ->> 'command_id')
       metadata ->> 'command_id',
       case when type = 'WorkflowCreated' then 'start'
            when type = 'TaskStateChanged' then 'resolve'
            else coalesce(data ->> 'trigger', 'command') end,
       'before-009',
       substr(stream_id, length('workflow-') + 1),
       recorded_at
from events
where metadata ? 'command_id'
order by metadata ->> 'command_id', position
on conflict (command_id) do nothing;
