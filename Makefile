# The two commands of README.md. Both install what they need (apt, pip, Maven) themselves.
.PHONY: demo demo-outbox test unit lint bootstrap down

bootstrap:
	@bash changeflow/deploy/bootstrap.sh

## Everything end to end: native stack, connector, worker, demo workload, zero-drift report, the read model
## "orders of users in New York" from the stores, the outbox with a consumer applying each event once, then
## one user erased from every store, view and topic, the request tracked until every projection confirms.
demo: bootstrap
	.venv/bin/changeflow demo
	.venv/bin/python -m examples.outbox.demo
	.venv/bin/python -m examples.erasure.demo

## The outbox pattern: orders and their events in one transaction, a consumer applying each once.
demo-outbox: bootstrap
	.venv/bin/changeflow stack up
	.venv/bin/python -m examples.outbox.demo

## The whole test suite: unit tests, then integration tests against the live local stack.
test: bootstrap
	.venv/bin/changeflow stack up
	.venv/bin/python -m pytest -p no:cacheprovider -ra tests

unit: bootstrap
	.venv/bin/python -m pytest -p no:cacheprovider -q tests/unit

lint: bootstrap
	.venv/bin/ruff check . && .venv/bin/mypy changeflow && .venv/bin/lint-imports

down:
	.venv/bin/changeflow stack down
