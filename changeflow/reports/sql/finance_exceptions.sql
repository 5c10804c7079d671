-- Finance exceptions, one row per problem, judged on the current state of the warehouse (FINAL).
--
-- Transaction-aware by a grace window: an exception is reported only once every row it is computed
-- from, deleted rows included, reached ClickHouse at least {grace_seconds} s ago (`_ingested_at`).
-- The sink writes one source transaction within moments (its changes sit next to each other on the
-- canonical topics), so a half-applied transaction (a payment whose order is still in flight, the
-- second payment of an order not yet written) is not judged yet. `detected_at` is when the last of
-- that evidence arrived. A transaction whose parts arrive further apart than the window (the sink held
-- up between two topics) can still be judged early; Debezium's transaction metadata would close that.
--
-- A delete reaches the warehouse as a tombstone row (`_is_deleted = 1`, hidden by FINAL) whose image may
-- carry only the key (REPLICA IDENTITY DEFAULT), so what a deleted row pointed at is taken from its
-- latest version that says. {database} and {grace_seconds} are substituted by reports.finance.ensure_views.
CREATE OR REPLACE VIEW {database}.finance_exceptions AS
WITH
    orders_live AS (
        SELECT id, status, total_amount, _ingested_at AS changed_at
        FROM {database}.orders FINAL WHERE _is_deleted = 0
    ),
    payments_live AS (
        SELECT id, order_id, amount, status, _ingested_at AS changed_at
        FROM {database}.payments FINAL WHERE _is_deleted = 0
    ),
    refunds_live AS (
        SELECT id, payment_id, order_id, amount, created_at, _ingested_at AS changed_at
        FROM {database}.refunds FINAL WHERE _is_deleted = 0
    ),
    orders_gone AS (
        SELECT id, max(_ingested_at) AS changed_at
        FROM {database}.orders WHERE _is_deleted = 1 GROUP BY id
    ),
    payments_gone AS (
        SELECT id, argMaxIf(order_id, _version, order_id IS NOT NULL) AS order_id, max(_ingested_at) AS changed_at
        FROM {database}.payments
        WHERE id IN (SELECT id FROM {database}.payments WHERE _is_deleted = 1)
        GROUP BY id
    ),
    refunds_gone AS (
        SELECT id,
               argMaxIf(payment_id, _version, payment_id IS NOT NULL) AS payment_id,
               argMaxIf(order_id, _version, order_id IS NOT NULL) AS order_id,
               max(_ingested_at) AS changed_at
        FROM {database}.refunds
        WHERE id IN (SELECT id FROM {database}.refunds WHERE _is_deleted = 1)
        GROUP BY id
    ),
    -- When anything about an order (itself, its payments, its refunds) last reached the warehouse.
    order_touched AS (
        SELECT order_id, max(changed_at) AS changed_at
        FROM (
            SELECT id AS order_id, changed_at FROM orders_live
            UNION ALL SELECT id, changed_at FROM orders_gone
            UNION ALL SELECT order_id, changed_at FROM payments_live
            UNION ALL SELECT order_id, changed_at FROM payments_gone
            UNION ALL SELECT order_id, changed_at FROM refunds_live
            UNION ALL SELECT order_id, changed_at FROM refunds_gone
        )
        WHERE order_id IS NOT NULL
        GROUP BY order_id
    ),
    -- When anything about a payment (itself, its refunds) last reached the warehouse.
    payment_touched AS (
        SELECT payment_id, max(changed_at) AS changed_at
        FROM (
            SELECT id AS payment_id, changed_at FROM payments_live
            UNION ALL SELECT id, changed_at FROM payments_gone
            UNION ALL SELECT payment_id, changed_at FROM refunds_live
            UNION ALL SELECT payment_id, changed_at FROM refunds_gone
        )
        WHERE payment_id IS NOT NULL
        GROUP BY payment_id
    ),
    refunded AS (
        SELECT payment_id, sum(amount) AS refunded, argMax(id, (created_at, id)) AS last_refund_id
        FROM refunds_live GROUP BY payment_id
    )
SELECT
    kind,
    CAST(order_id, 'Nullable(String)') AS order_id,
    CAST(payment_id, 'Nullable(String)') AS payment_id,
    CAST(refund_id, 'Nullable(String)') AS refund_id,
    CAST(expected, 'Nullable(Decimal(38, 2))') AS expected,
    CAST(actual, 'Nullable(Decimal(38, 2))') AS actual,
    CAST(detected_at, 'DateTime64(3, \'UTC\')') AS detected_at
FROM
(
    -- An order under way (neither pending nor cancelled) whose captured payments do not add up to its total.
    SELECT 'payment_mismatch' AS kind, o.id AS order_id, NULL AS payment_id, NULL AS refund_id,
           o.total_amount AS expected, c.captured AS actual, t.changed_at AS detected_at
    FROM orders_live AS o
    INNER JOIN (
        SELECT order_id, sum(amount) AS captured FROM payments_live WHERE status = 'captured' GROUP BY order_id
    ) AS c ON c.order_id = o.id
    INNER JOIN order_touched AS t ON t.order_id = o.id
    WHERE o.status NOT IN ('pending', 'cancelled') AND c.captured != o.total_amount

    UNION ALL

    -- A payment (any status) for an order that does not exist: expected nothing, actual its amount.
    SELECT 'orphan_payment', p.order_id, p.id, NULL, NULL, p.amount, greatest(pt.changed_at, ot.changed_at)
    FROM payments_live AS p
    INNER JOIN payment_touched AS pt ON pt.payment_id = p.id
    INNER JOIN order_touched AS ot ON ot.order_id = p.order_id
    WHERE p.order_id NOT IN (SELECT id FROM orders_live)

    UNION ALL

    -- Refunds of one payment adding up to more than the payment; refund_id is its latest refund.
    SELECT 'refund_exceeds_payment', p.order_id, p.id, r.last_refund_id, p.amount, r.refunded, pt.changed_at
    FROM payments_live AS p
    INNER JOIN refunded AS r ON r.payment_id = p.id
    INNER JOIN payment_touched AS pt ON pt.payment_id = p.id
    WHERE r.refunded > p.amount

    UNION ALL

    -- A cancelled order with a captured payment not fully refunded: expected the captured total back,
    -- actual what was refunded against those payments.
    SELECT 'cancelled_but_paid', o.id, NULL, NULL, cp.captured, cp.refunded, greatest(ot.changed_at, cp.changed_at)
    FROM orders_live AS o
    INNER JOIN (
        SELECT p.order_id AS order_id,
               sum(p.amount) AS captured,
               sum(ifNull(r.refunded, toDecimal64(0, 2))) AS refunded,
               countIf(ifNull(r.refunded, toDecimal64(0, 2)) < p.amount) AS short,
               max(pt.changed_at) AS changed_at
        FROM payments_live AS p
        LEFT JOIN refunded AS r ON r.payment_id = p.id
        INNER JOIN payment_touched AS pt ON pt.payment_id = p.id
        WHERE p.status = 'captured'
        GROUP BY p.order_id
    ) AS cp ON cp.order_id = o.id
    INNER JOIN order_touched AS ot ON ot.order_id = o.id
    WHERE o.status = 'cancelled' AND cp.short > 0
)
WHERE detected_at <= now64(3) - toIntervalSecond({grace_seconds})
ORDER BY detected_at, kind, order_id, payment_id
COMMENT 'Finance exceptions (payment_mismatch, orphan_payment, refund_exceeds_payment, cancelled_but_paid), one row each. Grace window: judged only once all rows involved (deletes included) reached ClickHouse at least {grace_seconds} s ago by _ingested_at, so a partly applied source transaction is not judged; detected_at = when the last of that evidence arrived.'
