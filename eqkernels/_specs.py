"""JSON round trip of versioned spec dataclasses (`AtomKernelSpec`, `EnvironmentSpec`), written once."""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import ClassVar


class VersionedSpec:
    """to_dict / to_json / from_dict of a dataclass spec, stored as {"spec_version": …, field: value, …}.

    A subclass sets `spec_version` (bump it when the meaning of a stored field changes) and `spec_what`
    (the word in error messages). Tuples are stored as lists, as JSON holds them.
    """

    spec_version: ClassVar[int] = 1
    spec_what: ClassVar[str] = "spec"

    def to_dict(self) -> dict:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"spec_version": self.spec_version, **values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        """The spec of `to_dict` output; ValueError for another spec version or unknown fields."""
        d = dict(d)
        found = d.pop("spec_version", None)
        if found != cls.spec_version:
            raise ValueError(f"{cls.spec_what} spec version {found} is not the supported version {cls.spec_version}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.spec_what} options {sorted(unknown)}")
        return cls(**d)
