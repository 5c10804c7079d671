"""The ``erasure:`` section's typed model (what a user writes), apart from its resolution and checks
(``pipelines.erasure``), as for the outbox: ``pipelines.model`` reads this module for its ``erasure`` field.

A *subject* is a kind of person (a user): the entity that holds them, the entities that refer to them and
what happens to those rows when the person is erased, and the other services that hold a copy and confirm
by hand. README "Erasure" is the reference.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IDENTIFIER = r"^[a-z_][a-z0-9_]*$"


class Strict(BaseModel):
    # pipelines.model's Strict, restated: that module imports this one for its `erasure` field.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Reference(Strict):
    """An entity whose rows point at the subject (``orders.user_id``), or at another referring entity's rows
    (``payments.order_id`` through ``orders``)."""

    column: str = Field(description="The column holding the key of the row it points at (the subject's key, or "
                                    "the key of the entity named by `through`).")
    through: str | None = Field(None, description="The referring entity this one points at; default: the "
                                                  "subject's own entity.")
    action: Literal["delete", "anonymise"] = Field(
        description="`delete`: the row goes from every store. `anonymise`: the row stays (an order kept for "
                    "finance) with `column` set to null, so its link to the person is cut, and the `clear` "
                    "fields set to null.")
    clear: list[str] = Field(default_factory=list, description="`anonymise` only: the personal fields also set "
                                                               "to null (a shipping address, a phone number).")


class External(Strict):
    """Another service that holds a copy of the person and confirms its own deletion
    (``changeflow erasure confirm REQUEST --projection NAME``, or over HTTP)."""

    description: str = Field("", description="Who they are and whom to ask (shown by `erasure status`).")


class Subject(Strict):
    entity: str = Field(description="The entity that holds the person; its key is the id `changeflow erase` "
                                    "takes.")
    refers: dict[str, Reference] = Field(default_factory=dict,
                                         description="The entities that refer to the person, by name.")
    external: dict[str, External] = Field(default_factory=dict,
                                          description="Other services holding a copy, by name.")

    @field_validator("external")
    @classmethod
    def _external_names(cls, v: dict[str, External]) -> dict[str, External]:
        for name in v:
            if not re.match(r"^[a-z][a-z0-9_-]{0,62}$", name):
                raise ValueError(f"external projection name {name!r}: lower-case letters, digits, - and _, "
                                 "starting with a letter, at most 63 characters")
        return v


class ErasureSection(Strict):
    subjects: dict[str, Subject] = Field(default_factory=dict, description="Kinds of person, by name "
                                                                           "(`changeflow erase <name> <id>`).")

    @field_validator("subjects")
    @classmethod
    def _subject_names(cls, v: dict[str, Subject]) -> dict[str, Subject]:
        for name in v:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"subject name {name!r} is not a lower-case identifier (letters, digits, _)")
        return v
