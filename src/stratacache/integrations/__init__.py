"""Adapters that plug stratacache into other frameworks' cache hooks (install each one's extra)."""
