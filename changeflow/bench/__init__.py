"""`changeflow bench`: the figures a user chooses a CDC pipeline by, measured on this machine in one run.

Every stage runs on its own topics, consumer groups, Redis database, search indexes and ClickHouse
database (see ``bench.common.Isolation``) so the live pipeline and other users of the stack are left
alone, and everything is removed at the end.
"""
