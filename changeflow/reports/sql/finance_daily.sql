-- Money per UTC day, from the current state of the warehouse (FINAL: deletes applied, latest version
-- wins). Orders count on the day they were placed whatever their status now; payments count only when
-- captured, on the day they were created (the source keeps no capture time); refunds on the day they
-- were created. Amounts stay Decimal, so the figures reconcile to the cent. {database} is substituted
-- by reports.finance.ensure_views.
CREATE OR REPLACE VIEW {database}.finance_daily AS
SELECT
    day,
    countIf(kind = 'order')                     AS orders_placed,
    sumIf(amount, kind = 'order')               AS orders_amount,
    countIf(kind = 'payment')                   AS payments_captured,
    sumIf(amount, kind = 'payment')             AS captured_amount,
    countIf(kind = 'refund')                    AS refunds,
    sumIf(amount, kind = 'refund')              AS refunded_amount,
    captured_amount - refunded_amount           AS net
FROM
(
    SELECT toDate32(created_at, 'UTC') AS day, 'order' AS kind, ifNull(total_amount, toDecimal64(0, 2)) AS amount
    FROM {database}.orders FINAL
    WHERE _is_deleted = 0 AND created_at IS NOT NULL
    UNION ALL
    SELECT toDate32(created_at, 'UTC'), 'payment', ifNull(amount, toDecimal64(0, 2))
    FROM {database}.payments FINAL
    WHERE _is_deleted = 0 AND created_at IS NOT NULL AND status = 'captured'
    UNION ALL
    SELECT toDate32(created_at, 'UTC'), 'refund', ifNull(amount, toDecimal64(0, 2))
    FROM {database}.refunds FINAL
    WHERE _is_deleted = 0 AND created_at IS NOT NULL
)
GROUP BY day
ORDER BY day
COMMENT 'Per UTC day: orders placed (count, amount), payments captured (count, amount), refunds (count, amount), net = captured - refunded. Exact Decimal(38, 2); current state (FINAL).'
