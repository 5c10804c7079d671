-- The demo `commerce` schema and what Debezium needs to capture it.
-- Idempotent: `changeflow stack up` runs it on every start; docker-compose mounts it as an init script.
-- The replication role's password is set by the caller (stack up / compose), never here.

CREATE TABLE IF NOT EXISTS public.products (
    id             bigserial PRIMARY KEY,
    sku            text UNIQUE NOT NULL,
    name           text NOT NULL,
    description    text,
    category       text,
    price_cents    integer NOT NULL CHECK (price_cents >= 0),
    stock          integer NOT NULL DEFAULT 0,
    internal_notes text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.orders (
    id           uuid PRIMARY KEY,
    user_id      text NOT NULL,
    status       text NOT NULL,
    total_amount numeric(12, 2) NOT NULL,
    items        jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.payments (
    id           uuid PRIMARY KEY,
    order_id     uuid NOT NULL,
    amount       numeric(12, 2) NOT NULL,
    status       text NOT NULL,
    provider_ref text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.refunds (
    id         uuid PRIMARY KEY,
    payment_id uuid NOT NULL,
    order_id   uuid NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Debezium's own tables. Signals (incremental snapshots for rebuild and repair) are rows in
-- debezium_signal; Debezium writes its snapshot watermarks there too. The heartbeat action query
-- writes debezium_heartbeat so the replication slot advances even while the captured tables are quiet.
CREATE TABLE IF NOT EXISTS public.debezium_signal (
    id   varchar(64) PRIMARY KEY,
    type varchar(32) NOT NULL,
    data text
);
-- Databases made when data was varchar(4096): a repair's signal for many keys did not fit.
ALTER TABLE public.debezium_signal ALTER COLUMN data TYPE text;
CREATE TABLE IF NOT EXISTS public.debezium_heartbeat (
    id integer PRIMARY KEY,
    ts timestamptz NOT NULL
);

-- Debezium's role: REPLICATION and SELECT on the captured tables, writes only on its own two tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'debezium') THEN
        CREATE ROLE debezium WITH LOGIN REPLICATION;
    END IF;
END
$$;
GRANT CONNECT ON DATABASE commerce TO debezium;
GRANT USAGE ON SCHEMA public TO debezium;
GRANT SELECT ON public.products, public.orders, public.payments, public.refunds TO debezium;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.debezium_signal, public.debezium_heartbeat TO debezium;

-- The publication is created in advance (Debezium runs with publication.autocreate.mode=disabled),
-- so the replication role needs no ownership of the tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'changeflow_pub') THEN
        CREATE PUBLICATION changeflow_pub FOR TABLE public.products, public.orders, public.payments, public.refunds;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication_tables WHERE pubname = 'changeflow_pub' AND tablename = 'debezium_signal') THEN
        ALTER PUBLICATION changeflow_pub ADD TABLE public.debezium_signal;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication_tables WHERE pubname = 'changeflow_pub' AND tablename = 'debezium_heartbeat') THEN
        ALTER PUBLICATION changeflow_pub ADD TABLE public.debezium_heartbeat;
    END IF;
END
$$;

-- Products carry full before-images (old price for product.price_changed). The other tables keep
-- the default identity, so an update that leaves a TOASTed column unchanged arrives with Debezium's
-- `__debezium_unavailable_value` placeholder, which the stream fills from each store's last state.
ALTER TABLE public.products REPLICA IDENTITY FULL;
