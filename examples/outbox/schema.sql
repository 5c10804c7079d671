-- The outbox example's source database: a service's orders and its outbox (the seed's outbox_messages),
-- written in one transaction. Run `psql -d shop -f schema.sql` on a database of its own.
CREATE TABLE IF NOT EXISTS public.orders (
  id bigint PRIMARY KEY,
  customer text NOT NULL,
  total_cents bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.outbox_messages (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  aggregate_type text NOT NULL,     -- routes the event: <namespace>.events.<aggregate_type>
  aggregate_id text NOT NULL,       -- the Kafka key: one aggregate's events stay in order
  event_type text NOT NULL,
  payload jsonb,
  trace_id text,                    -- carried as a header
  occurred_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),  -- the Kafka record's timestamp (UTC)
  created_at timestamptz NOT NULL DEFAULT now()
);
