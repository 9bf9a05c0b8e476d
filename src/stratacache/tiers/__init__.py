"""Storage tiers: ``hot`` (memory, HNSW), ``warm`` (LMDB), ``cold`` (SQLite).

Each tier owns its storage and its search; the engine owns placement (what moves where, when).
"""
