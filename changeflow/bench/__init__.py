"""`changeflow bench`: the figures a user chooses a CDC pipeline by, measured on this machine in one run.

Every stage runs on its own topics and consumer groups, and in each store on objects of its own (each store
module's ``isolate``, see ``bench.common.Isolation``) so the live pipeline and other users of the stack are
left alone, and everything is removed at the end (each store's ``purge``).
"""
