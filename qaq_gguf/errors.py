"""The package's own exception for profiles, apart from the modules that raise it (profile.py reads profiles,
llama.py loads models for them, runtime.py applies them), so that none of them imports another for it."""
from __future__ import annotations


class ProfileError(ValueError):
    """A profile that cannot be used: unreadable, for another model, or naming a type that does not fit."""
