"""The one thing pyproject.toml cannot declare stably: the canonical record's C codec
(changeflow/schemas/_codec.c says why it exists). Optional: without a C compiler the install still succeeds
and fastavro does that work."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("changeflow.schemas._codec", ["changeflow/schemas/_codec.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
