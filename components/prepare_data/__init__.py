"""The prepare_data component (interface only; see component.py)."""

from components.prepare_data.component import prepare_data

__all__ = ["prepare_data"]
