"""The CLI's commands, one module per command group.

Every module here is imported by ``changeflow.cli`` on every invocation (``--help`` included), so each command
imports what only it needs inside its own function, where a comment says so: psycopg, confluent-kafka, the
store modules and their clients, Faust. Measured with ``time.process_time()`` around ``import changeflow.cli``
(2026-12-07, this machine, three runs each): 0.37-0.46 s of CPU as written, 1.41-1.51 s with those imports at
the top of these modules, about a second more for every command.

The figure beside each import kept inside a function is what it adds after ``import changeflow.cli`` and its own
module (``time.perf_counter()`` around the import, median of 3 cold runs, 2-core dev box under load). An import
that adds under ~5 ms, or whose module ``changeflow.cli`` has loaded already, is at the top.
"""
